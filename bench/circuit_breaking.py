#!/usr/bin/env python3
"""Istio's circuit-breaking task, measured: shares of 200 per round, and the new connection's cost.

    python bench/circuit_breaking.py                    # 6 rounds of -c 2 -n 20, -c 3 -n 30
    python bench/circuit_breaking.py --rounds 8 --concurrency 1
    python bench/circuit_breaking.py --plaintext        # the rule plus tls DISABLE (diagnosis)
    python bench/circuit_breaking.py --handshake        # one new mTLS connection, 2 processes

The mesh is ``samples/circuit-breaking/mesh.yaml`` (sleep's sidecar with Istio's default of 2
workers unless ``--concurrency``) with the task's DestinationRule; the load is ``run_load``
through sleep's sidecar, as ``diktyo load --via sleep`` (fortio's behaviour: N/C requests per
connection, a new connection after each 503). Istio's task shows 85 % (-c 2) and 36.7 % (-c 3)
200. ``--handshake`` times a new upstream connection (TCP + mTLS, resumed session) through
diktyo's own ``open_upstream`` (client) and ``accept_inbound`` (server) between two idle
processes on uvloop, against an echo round trip on it: the pending window of the task. The
machine load moves every figure: the load average is printed; see docs/tasks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "samples" / "circuit-breaking"
URL = "http://httpbin:8000/get"
ISTIO = {2: 17 / 20, 3: 11 / 30}


def shares(rounds: int, concurrency: int | None, plaintext: bool, url_path: str = "/get") -> None:
    os.environ.setdefault("DIKTYO_CAPTURE", "proxy")
    from diktyo.load import LoadOptions, LoadResult, run_load
    from diktyo.platform.harness import MeshThread
    from diktyo.platform.mesh import load_mesh

    spec = load_mesh(SAMPLE / "mesh.yaml")
    if concurrency is not None:
        for wl in spec.workloads:
            if wl.name == "sleep":
                wl.annotations["proxy.istio.io/config"] = f'{{"concurrency": {concurrency}}}'
    rule = (SAMPLE / "destination-rule-httpbin-cb.yaml").read_text()
    if plaintext:
        rule = rule.replace("  trafficPolicy:\n", "  trafficPolicy:\n    tls:\n      mode: DISABLE\n")
    print(f"load average at start: {os.getloadavg()[0]:.1f}", flush=True)
    with tempfile.TemporaryDirectory() as tmp, MeshThread(spec) as mesh:
        path = Path(tmp) / "rule.yaml"
        path.write_text(rule)
        mesh.apply_file(path)
        mesh.wait_synced()
        sleep = next(w for w in mesh.describe()["workloads"] if w["workload"] == "sleep")
        env = {"HTTP_PROXY": f"http://127.0.0.1:{sleep['outbound_port']}"}

        def load(c: int, n: int) -> LoadResult:
            url = URL.replace("/get", url_path)
            options = LoadOptions(url=url, connections=c, requests=n, timeout=5.0)
            return asyncio.run(run_load(options, env=env))

        load(1, 5)
        got: dict[int, list[float]] = {2: [], 3: []}
        for r in range(rounds):
            line = [f"round {r}:"]
            for c, n in ((2, 20), (3, 30)):
                res = load(c, n)
                got[c].append(res.codes.get(200, 0) / n)
                line.append(
                    f"-c {c} {got[c][-1]:4.0%} (sockets {res.sockets}, {res.elapsed * 1e3:.0f} ms"
                    f"{', errors ' + str(res.errors) if res.errors else ''})"
                )
            print("  ".join(line), flush=True)
        print(f"sleep's upstream mTLS handshakes to httpbin: {_resumed(sleep['admin_port'])}")
    for c, values in got.items():
        print(
            f"-c {c}: mean {statistics.mean(values):.0%} (min {min(values):.0%}, max "
            f"{max(values):.0%}); Istio's task {ISTIO[c]:.1%}; rounds within 20 points: "
            f"{sum(abs(v - ISTIO[c]) <= 0.2 + 1e-9 for v in values)} of {len(values)}"
        )
    print(f"load average at end: {os.getloadavg()[0]:.1f}")


def _resumed(admin_port: int) -> str:
    """Envoy's cluster ``ssl.handshake`` / ``ssl.session_reused`` counters of httpbin's cluster."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/stats/prometheus", timeout=5) as r:
        lines = r.read().decode().splitlines()

    def total(name: str) -> float:
        return sum(
            float(ln.rsplit(" ", 1)[1])
            for ln in lines
            if ln.startswith(name + "{") and "httpbin" in ln
        )

    full = total("envoy_cluster_ssl_handshake")
    return f"{full:.0f}, of which {total('envoy_cluster_ssl_session_reused'):.0f} resumed"


def handshake(count: int) -> None:
    import uvloop

    from diktyo.control.ca import CertificateAuthority
    from diktyo.proxy.network.tls import CertificateStore, accept_inbound, peer_spiffe_id
    from diktyo.proxy.network.upstream import open_upstream
    from diktyo.snapshot.model import Endpoint

    server_id = "spiffe://cluster.local/ns/default/sa/httpbin"
    ca = CertificateAuthority.generate(trust_domain="cluster.local")

    def store(sid: str) -> CertificateStore:
        s = CertificateStore()
        key, issued = ca.issue(sid, None)
        s.update(issued.cert_chain_pem, key, ca.trust_bundle_pem())
        return s

    server_store = store(server_id)
    client_store = store("spiffe://cluster.local/ns/default/sa/sleep")

    class Echo(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.t = transport

        def data_received(self, data: bytes) -> None:
            self.t.write(data)

    class Client(asyncio.Protocol):
        def __init__(self) -> None:
            self.got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        def data_received(self, data: bytes) -> None:
            if not self.got.done():
                self.got.set_result(data)

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    sock.setblocking(False)
    port = sock.getsockname()[1]
    child = os.fork()
    if child == 0:

        async def serve() -> None:
            loop = asyncio.get_running_loop()
            while True:
                s, _ = await loop.sock_accept(sock)
                loop.create_task(accept_inbound(loop, s, Echo, "STRICT", server_store, 5))

        uvloop.run(serve())
        os._exit(0)

    def cpu_of(pid: int) -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        ep = Endpoint(address="127.0.0.1", port=port, principal=server_id, has_sidecar=True)
        connect: list[float] = []
        echo: list[float] = []
        resumed = 0
        c0 = s0 = 0.0
        for i in range(count + 20):
            if i == 20:  # warm-up done
                c0, s0 = time.process_time(), cpu_of(child)
            t0 = time.perf_counter()
            t, p = await open_upstream(loop, "127.0.0.1", port, None, Client, ep, client_store)
            t1 = time.perf_counter()
            t.write(b"hi")
            await p.got  # type: ignore[attr-defined]
            t2 = time.perf_counter()
            so = t.get_extra_info("ssl_object")
            assert peer_spiffe_id(so) == server_id
            t.close()
            if i >= 20:
                connect.append(t1 - t0)
                echo.append(t2 - t1)
                resumed += bool(so.session_reused)
            await asyncio.sleep(0.002)
        c1, s1 = time.process_time(), cpu_of(child)

        def q(xs: list[float]) -> str:
            xs = sorted(xs)
            return f"median {xs[len(xs) // 2] * 1e3:.2f} ms, p90 {xs[len(xs) * 9 // 10] * 1e3:.2f}"

        print(f"new connection, TCP + mTLS ({resumed} of {count} resumed): {q(connect)}")
        print(f"one echo round trip on it: {q(echo)}")
        print(
            f"CPU per connection (handshake, echo, close): client {(c1 - c0) / count * 1e3:.2f} ms,"
            f" server {(s1 - s0) / count * 1e3:.2f} ms; load average {os.getloadavg()[0]:.1f}"
        )

    try:
        uvloop.run(main())
    finally:
        os.kill(child, signal.SIGTERM)
        os.waitpid(child, 0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=6, help="rounds of -c 2 and -c 3 (default 6)")
    ap.add_argument("--concurrency", type=int, help="sleep's sidecar workers (default: the sample's 2)")
    ap.add_argument("--plaintext", action="store_true", help="no mTLS between the sidecars")
    ap.add_argument("--handshake", action="store_true", help="time one new mTLS connection instead")
    ap.add_argument("--count", type=int, default=300, help="connections for --handshake")
    ap.add_argument(
        "--path",
        default="/get",
        help="httpbin path the load asks for (default /get); /delay/0.003 makes each request\n"
        "take 3 ms longer in httpbin, as long as the 200s of Istio's run (diagnosis)",
    )
    args = ap.parse_args()
    if args.handshake:
        handshake(args.count)
    else:
        shares(args.rounds, args.concurrency, args.plaintext, args.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
