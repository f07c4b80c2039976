#!/usr/bin/env python3
"""Push through etcd: a change applied on one control-plane replica reaches N simulated
sidecars spread over three replicas (``diktyo control-plane --store etcd://...``).

Starts a 3-member etcd cluster (Debian's ``etcd-server``) and three replica processes on
127.0.0.1, registers the mesh of ``controlplane.py`` (10 services x 3 instances, a
VirtualService with a weighted split, a DestinationRule with subsets) and N proxies, and
connects N simulated sidecars (``controlplane.Sidecar``: long poll + ACK), sidecar i to
replica i % 3. Once all hold their first snapshot, it changes the VirtualService's weights
through replica 0 (``POST /v1/config``) and times each sidecar's receipt: p50/p99 overall
and per replica. The change travels apply -> etcd transaction -> every replica's watch ->
debounce (100 ms) -> translate -> long-poll answer. Compare with ``controlplane.py`` (one
replica, no etcd) for the same N.

    python bench/etcd_push.py                 # N = 1000
    python bench/etcd_push.py --sidecars 300
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import controlplane as cpb  # the shared simulated sidecar and mesh

ADMIN = "bench-admin-token"
CLI = "import sys; from diktyo.cli.main import main; sys.exit(main())"


def start_replicas(store: str, home: Path, n: int = 3) -> list[tuple[subprocess.Popen[bytes], str]]:
    env = {**os.environ, "DIKTYO_HOME": str(home)}
    out = []
    for i in range(n):
        argv = [sys.executable, "-c", CLI, "control-plane", "--port", "0", "--store", store,
                "--store-key-file", str(home / "store.key"), "--replica-id", f"r{i}"]  # fmt: skip
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
        assert p.stdout is not None
        while True:
            line = p.stdout.readline().decode()
            if not line:
                raise RuntimeError(f"replica r{i} did not start")
            if line.startswith("control plane serving on "):
                out.append((p, line.split()[4].rstrip(",")))
                break
    return out


async def bench(n: int, urls: list[str]) -> dict[str, Any]:
    cpb.AUTH = f"Authorization: Bearer {ADMIN}\r\n"
    hosts = [(u.split("//", 1)[1].rsplit(":", 1)[0], int(u.rsplit(":", 1)[1])) for u in urls]
    host0, port0 = hosts[0]
    for i in range(cpb.SERVICES):
        svc = {"hostname": cpb._fqdn(i), "namespace": cpb.NS, "short_name": f"svc{i}",
               "ports": [{"number": 9080, "name": "http", "protocol": "HTTP"}]}  # fmt: skip
        st, body = await cpb.request(host0, port0, "POST", "/v1/registry/services",
                                     json.dumps(svc).encode())  # fmt: skip
        assert st == 200, body
        for j in range(cpb.INSTANCES):
            inst = {"name": f"svc{i}-{j}", "workload": f"svc{i}-v{1 + j % 2}",
                    "address": "127.0.0.1", "ports": {"9080": 20000 + i * 10 + j},
                    "services": [cpb._fqdn(i)], "namespace": cpb.NS,
                    "labels": {"app": f"svc{i}", "version": f"v{1 + j % 2}"},
                    "has_sidecar": True}  # fmt: skip
            st, body = await cpb.request(host0, port0, "POST", "/v1/registry/instances",
                                         json.dumps(inst).encode())  # fmt: skip
            assert st == 200, body
    st, body = await cpb.request(host0, port0, "POST", "/v1/config",
                                 cpb.mesh_yaml(90).encode(), "application/yaml")  # fmt: skip
    assert st == 200, body
    sem = asyncio.Semaphore(50)

    async def register(i: int) -> None:
        h, p = hosts[i % len(hosts)]
        node = {"node": {"id": f"client-{i}.{cpb.NS}", "workload": f"client-{i}",
                         "namespace": cpb.NS, "labels": {"app": "client"}},
                "outbound_port": 15001}  # fmt: skip
        async with sem:
            st, body = await cpb.request(h, p, "POST", "/v1/registry/proxies",
                                         json.dumps(node).encode())  # fmt: skip
        assert st == 200, body

    await asyncio.gather(*(register(i) for i in range(n)))
    await asyncio.sleep(2.0)  # the proxies reach every replica through etcd
    cars = [cpb.Sidecar(*hosts[i % len(hosts)], f"client-{i}.{cpb.NS}") for i in range(n)]
    tasks = []
    for i, c in enumerate(cars):
        tasks.append(asyncio.ensure_future(c.run()))
        if i % 200 == 199:
            await asyncio.sleep(0.05)
    try:
        await cpb._wait_all(cars, lambda c: c.version and c.waiting.is_set(), 180, "first snapshot")
        await asyncio.sleep(2.0)
        await cpb._wait_all(cars, lambda c: c.waiting.is_set(), 60, "clients back in long poll")
        first = {c.node: c.version for c in cars}
        t0 = time.monotonic()
        st, body = await cpb.request(host0, port0, "POST", "/v1/config",
                                     cpb.mesh_yaml(80).encode(), "application/yaml")  # fmt: skip
        if st != 200:
            raise RuntimeError(f"config change rejected ({st}): {body[:300]!r}")
        await cpb._wait_all(cars, lambda c: c.version != first[c.node], 120, "the change")
        recv = [min(t for v, t in c.received.items() if v != first[c.node]) - t0 for c in cars]
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    per_replica = {}
    for r in range(len(hosts)):
        mine = recv[r :: len(hosts)]
        per_replica[f"r{r}"] = {"p50": cpb._pct(mine, 0.5) * 1e3, "p99": cpb._pct(mine, 0.99) * 1e3}
    return {
        "sidecars": n,
        "replicas": len(hosts),
        "receive_ms": {
            "first": min(recv) * 1e3,
            "p50": cpb._pct(recv, 0.5) * 1e3,
            "p99": cpb._pct(recv, 0.99) * 1e3,
            "max": max(recv) * 1e3,
        },
        "per_replica_ms": per_replica,
        "reconnects": sum(c.reconnects for c in cars),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sidecars", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=HERE / "results", help="results directory")
    args = ap.parse_args(argv)
    from diktyo.testing.etcd import EtcdCluster, etcd_available

    if not etcd_available():
        print("etcd_push: skipped: etcd is not installed (etcd-server)", file=sys.stderr)
        return 0
    import uvloop

    started = dt.datetime.now(dt.UTC)
    with tempfile.TemporaryDirectory(prefix="diktyo-etcd-bench-") as tmp:
        home = Path(tmp) / "home"
        home.mkdir()
        (home / "admin-token").write_text(ADMIN)
        os.chmod(home / "admin-token", 0o600)
        (Path(tmp) / "etcd").mkdir()
        cluster = EtcdCluster(Path(tmp) / "etcd", members=3, name="b")
        cluster.start()
        replicas: list[tuple[subprocess.Popen[bytes], str]] = []
        try:
            replicas = start_replicas(cluster.store_url, home)
            result = uvloop.run(bench(args.sidecars, [u for _, u in replicas]))
        finally:
            for p, _ in replicas:
                p.terminate()
            for p, _ in replicas:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
            cluster.close()
    result["date"] = started.isoformat(timespec="seconds")
    result["loadavg"] = Path("/proc/loadavg").read_text().split()[:3]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{started.strftime('%Y-%m-%d-%H%M')}-etcd-push-{args.sidecars}"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    r = result["receive_ms"]
    print(
        f"etcd push, {args.sidecars} sidecars over {result['replicas']} replicas: "
        f"first {r['first']:.0f} ms, p50 {r['p50']:.0f} ms, p99 {r['p99']:.0f} ms, "
        f"max {r['max']:.0f} ms; per replica {json.dumps(result['per_replica_ms'])}; "
        f"load average {' '.join(result['loadavg'])}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
