#!/usr/bin/env python3
"""Control-plane push benchmark: time from a config change until N simulated sidecars have
received and acknowledged it, and the control plane's memory per connected sidecar.

The control plane (``diktyo.control.server.ControlPlane``, its real translator, uvloop) runs
in its own process pinned to core 0. This process, pinned to core 1, registers a small mesh
(10 services x 3 instances, a VirtualService with a weighted split and a DestinationRule with
subsets), registers N proxies, and runs N long-poll clients (raw asyncio streams, the protocol
in docs/mesh-file.md, "Control plane API": ``GET /v1/snapshot?node=&version=`` then
``POST /v1/ack``). Once every client holds the first version and waits in its long poll, it
changes the VirtualService's weights (``POST /v1/config``) and times each client's receipt and ACK.
The figures include the control plane's 100 ms debounce (istiod also waits 100 ms).

    python bench/controlplane.py            # N = 100, 1000, 5000
    python bench/controlplane.py --quick    # N = 100, 1000
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

SERVICES = 10
INSTANCES = 3
NS = "default"


def _fqdn(i: int) -> str:
    return f"svc{i}.{NS}.svc.cluster.local"


def mesh_yaml(weight_v1: int) -> str:
    return f"""apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: svc0
  namespace: {NS}
spec:
  hosts: [svc0]
  http:
  - match:
    - headers:
        end-user:
          exact: jason
    route:
    - destination: {{host: svc0, subset: v2}}
  - match:
    - uri: {{prefix: /api/}}
    route:
    - destination: {{host: svc0, subset: v1}}
      weight: {weight_v1}
    - destination: {{host: svc0, subset: v2}}
      weight: {100 - weight_v1}
  - route:
    - destination: {{host: svc0, subset: v1}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: svc0
  namespace: {NS}
spec:
  host: svc0
  trafficPolicy:
    connectionPool:
      tcp: {{maxConnections: 100}}
    outlierDetection:
      consecutive5xxErrors: 5
      interval: 10s
      baseEjectionTime: 30s
  subsets:
  - name: v1
    labels: {{version: v1}}
  - name: v2
    labels: {{version: v2}}
"""


# --------------------------------------------------------------------------- server side


def serve() -> int:
    """Run the control plane in this process and print its URL as a JSON line."""
    import uvloop

    from diktyo.control.server import ControlPlane

    async def main() -> None:
        cp = ControlPlane()
        url = await cp.start()
        ready = {"event": "ready", "url": url, "admin_token": cp.admin_token}
        print(json.dumps(ready), flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await cp.stop()

    try:
        uvloop.run(main())
    except KeyboardInterrupt:
        pass
    return 0


# --------------------------------------------------------------------------- raw HTTP client


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    n = int(headers.get("content-length", "0"))
    body = await reader.readexactly(n) if n else b""
    return status, headers, body


# "Authorization: Bearer ...\r\n": the control plane's admin credential (from its ready line);
# the simulated sidecars use it too (the control plane accepts it for snapshots and ACKs)
AUTH = ""


async def request(
    host: str, port: int, method: str, path: str, body: bytes = b"", ctype: str = "application/json"
) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(
            f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\n{AUTH}Content-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        status, _, data = await _read_response(reader)
        return status, data
    finally:
        writer.close()


class Sidecar:
    """One simulated sidecar: a keep-alive connection doing long polls and ACKs."""

    def __init__(self, host: str, port: int, node: str) -> None:
        self.host, self.port, self.node = host, port, node
        self.version = ""
        self.size = 0
        self.received: dict[str, float] = {}
        self.acked: dict[str, float] = {}
        self.waiting = asyncio.Event()
        self.error = ""
        self.reconnects = 0
        self.last_failure = ""

    async def run(self) -> None:
        """Poll for ever; reconnect like a real sidecar when the connection fails."""
        while True:
            try:
                await self._session()
                return
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                self.waiting.clear()
                self.reconnects += 1
                self.last_failure = f"{type(exc).__name__}: {exc}"
                if self.reconnects > 50:
                    self.error = f"gave up after 50 reconnects; last: {self.last_failure}"
                    return
                await asyncio.sleep(min(2.0, 0.1 * self.reconnects))

    async def _session(self) -> None:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            while True:
                writer.write(
                    f"GET /v1/snapshot?node={self.node}&version={self.version} HTTP/1.1\r\n"
                    f"Host: {self.host}\r\n{AUTH}\r\n".encode()
                )
                self.waiting.set()
                status, headers, body = await _read_response(reader)
                self.waiting.clear()
                if status == 204:
                    continue
                if status != 200:
                    self.error = f"GET /v1/snapshot answered {status}: {body[:200]!r}"
                    return
                now = time.monotonic()
                version = headers.get("x-diktyo-version", "")
                self.received[version] = now
                self.size = len(body)
                json.loads(body)  # a real sidecar decodes what it gets
                ack = json.dumps({"node": self.node, "version": version, "ok": True}).encode()
                writer.write(
                    f"POST /v1/ack HTTP/1.1\r\nHost: {self.host}\r\n{AUTH}"
                    "Content-Type: application/json\r\n"
                    f"Content-Length: {len(ack)}\r\n\r\n".encode()
                    + ack
                )
                st, _, _ = await _read_response(reader)
                if st != 200:
                    self.error = f"POST /v1/ack answered {st}"
                    return
                self.acked[version] = time.monotonic()
                self.version = version
        finally:
            writer.close()


# --------------------------------------------------------------------------- the benchmark


def _proc_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _wait_all(cars: list[Sidecar], pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not all(pred(c) for c in cars):
        errs = [c.error for c in cars if c.error]
        if errs:
            raise RuntimeError(f"sidecar failed: {errs[0]}")
        if time.monotonic() > deadline:
            done = sum(1 for c in cars if pred(c))
            late = [c for c in cars if not pred(c)][:3]
            why = "; ".join(
                f"{c.node}: version={c.version!r} waiting={c.waiting.is_set()} "
                f"reconnects={c.reconnects} last failure={c.last_failure!r}"
                for c in late
            )
            raise RuntimeError(
                f"timed out after {timeout:.0f}s waiting for {what}: {done}/{len(cars)}; e.g. {why}"
            )
        await asyncio.sleep(0.01)


def _pct(vals: list[float], q: float) -> float:
    vals = sorted(vals)
    return vals[min(len(vals) - 1, int(q * (len(vals) - 1) + 0.5))]


async def bench_one(n: int, server_pid: int, host: str, port: int) -> dict[str, Any]:
    t_setup = time.monotonic()
    rss_empty = _proc_kib(server_pid, "VmRSS")
    for i in range(SERVICES):
        svc = {
            "hostname": _fqdn(i),
            "namespace": NS,
            "short_name": f"svc{i}",
            "ports": [{"number": 9080, "name": "http", "protocol": "HTTP"}],
        }
        st, body = await request(
            host, port, "POST", "/v1/registry/services", json.dumps(svc).encode()
        )
        assert st == 200, body
        for j in range(INSTANCES):
            inst = {
                "name": f"svc{i}-{j}",
                "workload": f"svc{i}-v{1 + j % 2}",
                "address": "127.0.0.1",
                "ports": {"9080": 20000 + i * 10 + j},
                "services": [_fqdn(i)],
                "namespace": NS,
                "labels": {"app": f"svc{i}", "version": f"v{1 + j % 2}"},
                "has_sidecar": True,
            }
            st, body = await request(
                host, port, "POST", "/v1/registry/instances", json.dumps(inst).encode()
            )
            assert st == 200, body
    st, body = await request(
        host, port, "POST", "/v1/config", mesh_yaml(90).encode(), "application/yaml"
    )
    if st != 200:
        raise RuntimeError(f"POST /v1/config answered {st}: {body[:500]!r}")

    sem = asyncio.Semaphore(50)

    async def register(i: int) -> None:
        node = {
            "node": {
                "id": f"client-{i}.{NS}",
                "workload": f"client-{i}",
                "namespace": NS,
                "labels": {"app": "client"},
            },
            "outbound_port": 15001,
        }
        async with sem:
            st, body = await request(
                host, port, "POST", "/v1/registry/proxies", json.dumps(node).encode()
            )
        assert st == 200, body

    t_reg = time.monotonic()
    await asyncio.gather(*(register(i) for i in range(n)))
    register_s = time.monotonic() - t_reg
    await asyncio.sleep(0.5)  # let the debounced push of the registrations settle
    rss_before = _proc_kib(server_pid, "VmRSS")

    cars = [Sidecar(host, port, f"client-{i}.{NS}") for i in range(n)]
    tasks = []
    for i, c in enumerate(cars):
        tasks.append(asyncio.ensure_future(c.run()))
        if i % 200 == 199:
            await asyncio.sleep(0.05)  # don't overflow the listen backlog
    try:
        await _wait_all(
            cars, lambda c: c.version and c.waiting.is_set(), 120, "first snapshot + ACK"
        )
        await asyncio.sleep(1.0)  # quiet: the last registration push may still be going out
        await _wait_all(cars, lambda c: c.waiting.is_set(), 60, "clients back in long poll")
        first_versions = {c.version for c in cars}
        await asyncio.sleep(0.3)
        rss_connected = _proc_kib(server_pid, "VmRSS")
        cpu0 = _proc_cpu(server_pid)

        t0 = time.monotonic()
        st, body = await request(
            host, port, "POST", "/v1/config", mesh_yaml(80).encode(), "application/yaml"
        )
        if st != 200:
            raise RuntimeError(f"config change rejected ({st}): {body[:500]!r}")
        await _wait_all(
            cars, lambda c: c.version not in first_versions, 120, "the changed snapshot + ACK"
        )
        t_all = time.monotonic() - t0
        cpu = _proc_cpu(server_pid) - cpu0
        recv = [min(t for v, t in c.received.items() if v not in first_versions) - t0 for c in cars]
        acks = [min(t for v, t in c.acked.items() if v not in first_versions) - t0 for c in cars]
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "sidecars": n,
        "snapshot_bytes": statistics.median(c.size for c in cars),
        "register_s": round(register_s, 3),
        "setup_s": round(time.monotonic() - t_setup, 3),
        "receive_ms": {
            "first": min(recv) * 1e3,
            "p50": _pct(recv, 0.5) * 1e3,
            "p99": _pct(recv, 0.99) * 1e3,
            "max": max(recv) * 1e3,
        },
        "ack_ms": {
            "p50": _pct(acks, 0.5) * 1e3,
            "p99": _pct(acks, 0.99) * 1e3,
            "max": max(acks) * 1e3,
        },
        "all_acked_ms": t_all * 1e3,
        "server_cpu_s": cpu,
        "server_rss_mib": {
            "empty": rss_empty / 1024,
            "registered": rss_before / 1024,
            "connected": rss_connected / 1024,
            "peak": _proc_kib(server_pid, "VmHWM") / 1024,
        },
        "reconnects": sum(c.reconnects for c in cars),
        "kib_per_connected_sidecar": (rss_connected - rss_before) / n,
        "kib_per_sidecar_total": (rss_connected - rss_empty) / n,
    }


def start_server() -> tuple[subprocess.Popen[bytes], str, int]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--serve"]
    if os.cpu_count() and os.cpu_count() > 1:  # type: ignore[operator]
        argv = ["taskset", "-c", "0", *argv]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None
    line = p.stdout.readline()
    if not line:
        err = p.stderr.read().decode(errors="replace") if p.stderr else ""
        p.kill()
        raise RuntimeError(f"control plane did not start:\n{err[-3000:]}")
    global AUTH
    ready = json.loads(line)
    url = ready["url"]
    AUTH = f"Authorization: Bearer {ready['admin_token']}\r\n"
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    return p, host, int(port)


def markdown(result: dict[str, Any]) -> str:
    lines = [
        (
            f"# diktyo control-plane push, {result['mode']} run, {result['date']}, "
            f"diktyo {result.get('commit', '')}"
        ),
        "",
        (
            "Time from `POST /v1/config` (a VirtualService weight change that alters every sidecar's "
            "snapshot) until each simulated sidecar received it and until all had ACKed; includes the "
            "100 ms debounce. Control plane on core 0, clients on core 1. Memory: the control plane's "
            "RSS growth when the N long polls connect, divided by N (connection + long-poll state), and its "
            "growth from empty to N registered and connected sidecars, divided by N (also the cached "
            "snapshots and registry)."
        ),
        "",
    ]
    if result.get("skipped"):
        return "\n".join(lines + [f"SKIPPED: {result['skipped']}", ""])
    lines += [
        "| sidecars | snapshot | first recv | p50 recv | p99 recv | all ACKed | CP CPU | KiB / connected sidecar | KiB / sidecar, all | CP RSS |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        if "error" in r:
            lines.append(f"| {r['sidecars']} | ERROR: {r['error'][:200]} |||||||||")
            continue
        lines.append(
            f"| {r['sidecars']} | {r['snapshot_bytes'] / 1024:.1f} KiB | {r['receive_ms']['first']:.0f} ms | "
            f"{r['receive_ms']['p50']:.0f} ms | {r['receive_ms']['p99']:.0f} ms | {r['all_acked_ms']:.0f} ms | "
            f"{r['server_cpu_s']:.2f} s | {r['kib_per_connected_sidecar']:.1f} | "
            f"{r['kib_per_sidecar_total']:.1f} | {r['server_rss_mib']['connected']:.0f} MiB |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="N = 100, 1000 (default adds 5000)")
    ap.add_argument("--sizes", help="comma-separated numbers of sidecars, e.g. 10,100")
    ap.add_argument("--out", type=Path, default=HERE / "results", help="results directory")
    ap.add_argument(
        "--commit", metavar="REV", help="benchmark the control plane as committed at REV"
    )
    args = ap.parse_args(argv)
    if args.serve:
        return serve()
    if args.commit and not os.environ.get("DIKTYO_BENCH_SRC"):
        from run import _reexec_at_commit

        return _reexec_at_commit(args.commit)

    try:
        import diktyo.control.server
        import diktyo.control.translate  # noqa: F401
    except ImportError as exc:
        print(
            f"controlplane: skipped: the control plane is not importable here ({exc})",
            file=sys.stderr,
        )
        return 0
    sizes = (
        [int(x) for x in args.sizes.split(",")]
        if args.sizes
        else ([100, 1000] if args.quick else [100, 1000, 5000])
    )
    mode = "quick" if args.quick else "custom" if args.sizes else "full"
    if os.cpu_count() and os.cpu_count() > 1:  # type: ignore[operator]
        os.sched_setaffinity(0, {1})
    import uvloop

    started = dt.datetime.now(dt.UTC)
    runs = []
    for n in sizes:
        proc, host, port = start_server()
        try:
            res = uvloop.run(bench_one(n, proc.pid, host, port))
        except Exception as exc:  # noqa: BLE001 - recorded in the results
            res = {"sidecars": n, "error": f"{type(exc).__name__}: {exc}"}
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        runs.append(res)
        print(f"controlplane: N={n}: " + json.dumps(res), file=sys.stderr)
    result = {
        "commit": os.environ.get("DIKTYO_BENCH_COMMIT", "working tree"),
        "mode": mode,
        "date": started.isoformat(timespec="seconds"),
        "runs": runs,
        "python": sys.version.split()[0],
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{started.strftime('%Y-%m-%d-%H%M')}-controlplane-{mode}"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    md = markdown(result)
    (args.out / f"{stem}.md").write_text(md)
    print(md)
    return 1 if all("error" in r for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
