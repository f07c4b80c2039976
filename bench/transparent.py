"""Transparent capture against proxy mode: what the iptables redirect and the
original-destination lookup cost, measured interleaved in one run.

    .venv/bin/python bench/transparent.py            # 3 repetitions x 10 s per cell
    .venv/bin/python bench/transparent.py --quick    # 2 repetitions x 3 s
    .venv/bin/python bench/transparent.py --smoke    # 1 repetition x 1 s, -c50 only

Needs root (network namespaces, iptables), nginx and wrk. Two local meshes run at once, each
with workload ``hello`` (a one-worker nginx, ``return 200``, on ``$PORT``) and ``bench-client``
(``diktyo.samples.sleep``):

- ``proxy``: ``capture: proxy``; wrk on the host sends ``GET /`` with ``Host: hello:9080`` to
  the client sidecar's outbound (HTTP proxy) port, as an app with ``HTTP_PROXY`` does;
- ``transparent``: ``capture: transparent``; wrk runs inside the client's network namespace
  and asks for ``http://hello:9080/`` with no proxy: the name resolves to the service VIP,
  iptables redirects the connection to 15001, the sidecar reads ``SO_ORIGINAL_DST``, dials
  the server's pod address, whose namespace redirects it to 15006, and the server sidecar
  forwards to nginx on 127.0.0.1.

Both cross two sidecars with auto mTLS; the differences are the NAT redirects (twice), the
original-destination lookups (twice) and the demultiplexing on 15001/15006. Cells: mode x
wrk connections (1, 50), the mode order rotated per repetition. Sidecars on core 0; wrk, nginx
and this process (the control planes) on core 1. Figures per cell: rps, p50/p99, CPU µs per
request of both sidecars (utime+stime and schedstat). A micro measure times
``getsockopt(SO_ORIGINAL_DST)`` alone on a redirected socket. Before measuring, 10 requests
per mode must be counted by the server sidecar (``istio_requests_total``, reporter destination):
proof the load crosses the mesh. Results: ``bench/results/<date>-transparent[-quick|-smoke]
.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

from configs import upstream_nginx_conf
from procs import LOAD_CORE, PROXY_CORE, cpu_seconds, sched_ns, tree

from diktyo.platform.capture_apply import apply as apply_rules
from diktyo.platform.capture_netns import AddressPlan, Netns, capture_unavailable_reason
from diktyo.platform.capture_rules import CaptureConfig
from diktyo.platform.harness import MeshThread

LUA = HERE / "report.lua"
RESULTS = HERE / "results"
HOST = "hello:9080"
MODES = ("proxy", "transparent")
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class BenchError(RuntimeError):
    """The benchmark cannot run or measure; the message says why and what to do."""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def write_mesh(tmp: Path, mode: str, tag: str) -> Path:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        raise BenchError("nginx is not installed: apt-get install -y nginx")
    (tmp / "upstream.conf.in").write_text(
        upstream_nginx_conf(tmp, 54321).replace("54321", "@PORT@")
    )
    script = (
        f'sed "s/@PORT@/$PORT/" {tmp}/upstream.conf.in > {tmp}/upstream.conf && '
        f"exec {nginx} -p {tmp} -c {tmp}/upstream.conf"
    )
    net = "capture: proxy\n"
    if mode == "transparent":
        net = (
            "capture: transparent\n"
            f"network: {{cidr: 10.{100 + secrets.randbelow(100)}.0.0/16, "
            f"namePrefix: dkb{tag}-, linkPrefix: b{tag}}}\n"
        )
    spec = tmp / "mesh.yaml"
    spec.write_text(
        f"name: {mode}-bench\n{net}"
        f"""services:
  - name: hello
    ports: [{{name: http, port: 9080}}]
workloads:
  - name: hello
    labels: {{app: hello, version: v1}}
    command: {json.dumps(["/bin/sh", "-c", script])}
  - name: bench-client
    labels: {{app: bench-client}}
    command: {json.dumps([sys.executable, "-m", "diktyo.samples.sleep"])}
"""
    )
    return spec


def workload(mesh: MeshThread, name: str) -> dict[str, Any]:
    return next(w for w in mesh.describe()["workloads"] if w["workload"] == name)


def pin(pid: int, core: int) -> None:
    if shutil.which("taskset") and (os.cpu_count() or 1) > core:
        for p in tree(pid):
            subprocess.run(
                ["taskset", "-a", "-p", "-c", str(core), str(p)], capture_output=True, check=False
            )


def wrk_argv(mode: str, client: dict[str, Any], conns: int, seconds: int) -> list[str]:
    argv = ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency", "-s", str(LUA)]
    if (os.cpu_count() or 1) > LOAD_CORE and shutil.which("taskset"):
        argv = ["taskset", "-c", str(LOAD_CORE), *argv]
    if mode == "proxy":
        return [*argv, "-H", f"Host: {HOST}", f"http://127.0.0.1:{client['outbound_port']}/"]
    return ["ip", "netns", "exec", client["netns"], *argv, f"http://{HOST}/"]


def wrk(argv: list[str], seconds: int) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    out = subprocess.run(
        argv, capture_output=True, text=True, check=False, timeout=seconds + 30, env=env
    )
    for line in out.stdout.splitlines():
        if line.startswith("WRKJSON "):
            res: dict[str, Any] = json.loads(line[8:])
            dur = res["duration_us"] / 1e6
            res["rps"] = res["requests"] / dur if dur else 0.0
            res["error_count"] = sum(res["errors"].values())
            return res
    raise BenchError(f"wrk gave no result (exit {out.returncode}): {out.stderr[-400:]}")


def server_count(server: dict[str, Any]) -> float:
    host = server.get("address") or "127.0.0.1"
    with _opener.open(f"http://{host}:{server['admin_port']}/stats/prometheus", timeout=5) as r:
        text = r.read().decode()
    return sum(
        float(ln.rsplit(" ", 1)[1])
        for ln in text.splitlines()
        if ln.startswith("istio_requests_total{") and 'reporter="destination"' in ln
    )


def check(mode: str, client: dict[str, Any], server: dict[str, Any]) -> float:
    """10 requests through ``mode``'s path; how many the server sidecar counted."""
    before = server_count(server)
    res = wrk([*wrk_argv(mode, client, 1, 1)[:-1], wrk_argv(mode, client, 1, 1)[-1]], 1)
    time.sleep(0.3)
    counted = server_count(server) - before
    if res["requests"] == 0 or counted < min(10, res["requests"]) or res["error_count"]:
        raise BenchError(f"{mode}: {res['requests']} requests, server sidecar counted {counted}")
    log(f"{mode}: server sidecar counted {counted:g} of {res['requests']} check requests")
    return counted


def measure(
    mode: str, client: dict[str, Any], conns: int, seconds: int, pids: list[int]
) -> dict[str, Any]:
    trees = [p for pid in pids for p in tree(pid)]
    cpu0, ns0 = cpu_seconds(trees), sched_ns(trees)
    res = wrk(wrk_argv(mode, client, conns, seconds), seconds)
    cpu1, ns1 = cpu_seconds(trees), sched_ns(trees)
    n = max(1, res["requests"])
    return {
        "mode": mode,
        "connections": conns,
        "rps": res["rps"],
        "requests": res["requests"],
        "errors": res["error_count"],
        "p50_us": res["latency_us"]["p50"],
        "p99_us": res["latency_us"]["p99"],
        "cpu_us_per_req": (cpu1 - cpu0) * 1e6 / n,
        "sched_us_per_req": (ns1 - ns0) / 1e3 / n,
    }


def original_dst_cost(calls: int = 100_000) -> dict[str, float]:
    """µs per ``getsockopt(SO_ORIGINAL_DST)`` on a redirected socket, and per plain
    ``getsockname`` on the same socket for comparison (a namespace of its own, torn down)."""
    tag = secrets.token_hex(2)
    netns = Netns(prefix=f"dkb{tag}-", link_prefix=f"o{tag}")
    plan = AddressPlan(f"10.{100 + secrets.randbelow(100)}.{secrets.randbelow(256)}.0/24")
    code = (
        "import socket, time, json\n"
        "l = socket.socket(); l.bind(('0.0.0.0', 15001)); l.listen(1)\n"
        f"c = socket.socket(); c.connect(('{plan.vip('x')}', 80))\n"
        "s, _ = l.accept()\n"
        f"n = {calls}\n"
        "t = time.perf_counter()\n"
        "for _ in range(n): s.getsockopt(socket.SOL_IP, 80, 16)\n"
        "a = (time.perf_counter() - t) / n * 1e6\n"
        "t = time.perf_counter()\n"
        "for _ in range(n): s.getsockname()\n"
        "b = (time.perf_counter() - t) / n * 1e6\n"
        "print(json.dumps({'so_original_dst_us': a, 'getsockname_us': b}))\n"
    )
    try:
        netns.create_bridge(plan)
        ns = netns.add_namespace("od", plan.pod("od"), plan)
        apply_rules(CaptureConfig.injected(), netns=ns)
        out = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-c", code],
            capture_output=True, text=True, check=False, timeout=60,
        )  # fmt: skip
        if out.returncode != 0:
            raise BenchError(f"original-dst micro measure failed: {out.stderr[-400:]}")
        result: dict[str, float] = json.loads(out.stdout)
        return result
    finally:
        netns.remove_all()


def run(reps: int, seconds: int, conns_list: list[int]) -> dict[str, Any]:
    if not shutil.which("wrk"):
        raise BenchError("wrk is not installed: apt-get install -y wrk")
    if capture_unavailable_reason() is not None:
        raise BenchError(f"transparent mode unavailable: {capture_unavailable_reason()}")
    if (os.cpu_count() or 1) > LOAD_CORE:
        os.sched_setaffinity(0, {LOAD_CORE})
    tag = secrets.token_hex(2)
    samples: list[dict[str, Any]] = []
    checks: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="diktyo-tp-") as td:
        tmp = Path(td)
        meshes: dict[str, MeshThread] = {}
        try:
            for mode in MODES:
                (tmp / mode).mkdir()
                log(f"starting the {mode} mesh ...")
                meshes[mode] = MeshThread(
                    write_mesh(tmp / mode, mode, tag), start_timeout=90
                ).start()
            ends: dict[str, tuple[dict[str, Any], dict[str, Any], list[int]]] = {}
            for mode, mesh in meshes.items():
                mesh.wait_synced()
                client, server = workload(mesh, "bench-client"), workload(mesh, "hello")
                pids = [int(client["sidecar_pid"]), int(server["sidecar_pid"])]
                for pid in pids:
                    pin(pid, PROXY_CORE)
                ends[mode] = (client, server, pids)
                checks[mode] = check(mode, client, server)
            for rep in range(reps):
                order = MODES if rep % 2 == 0 else tuple(reversed(MODES))
                for conns in conns_list:
                    for mode in order:
                        client, _, pids = ends[mode]
                        s = measure(mode, client, conns, seconds, pids)
                        s["rep"] = rep
                        samples.append(s)
                        log(f"rep {rep} {mode} -c{conns}: {s['rps']:.0f} rps, p50 {s['p50_us']} us, "
                            f"{s['cpu_us_per_req']:.0f} us CPU/req")  # fmt: skip
        finally:
            for mesh in meshes.values():
                mesh.stop()
    micro = original_dst_cost()
    log(f"SO_ORIGINAL_DST: {micro['so_original_dst_us']:.2f} us per call")
    return {"samples": samples, "checks": checks, "original_dst": micro}


def summarize(samples: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    cells: dict[str, list[dict[str, Any]]] = {}
    for s in samples:
        cells.setdefault(f"{s['mode']} -c{s['connections']}", []).append(s)
    keys = ("rps", "p50_us", "p99_us", "cpu_us_per_req", "sched_us_per_req")
    return {c: {k: statistics.median(x[k] for x in ss) for k in keys} for c, ss in cells.items()}


def markdown(r: dict[str, Any]) -> str:
    lines = [
        f"# Transparent capture vs proxy mode ({r['date']}, {r['mode']}, commit {r['commit']})",
        "",
        (
            f"{r['reps']} repetitions x {r['seconds']} s per cell, medians. Both paths cross two "
            "sidecars with mTLS; transparent adds two NAT redirects, two SO_ORIGINAL_DST lookups "
            "and the 15001/15006 demultiplexing."
        ),
        "",
        "| cell | rps | p50 µs | p99 µs | sidecars CPU µs/req | sched µs/req |",
        "|---|---|---|---|---|---|",
    ]
    for cell, m in sorted(r["summary"].items()):
        lines.append(
            f"| {cell} | {m['rps']:.0f} | {m['p50_us']:.0f} | {m['p99_us']:.0f} | "
            f"{m['cpu_us_per_req']:.0f} | {m['sched_us_per_req']:.0f} |"
        )
    lines += ["", "| ratio transparent / proxy | rps | p50 | CPU/req |", "|---|---|---|---|"]
    for conns in r["connections"]:
        t, p = r["summary"].get(f"transparent -c{conns}"), r["summary"].get(f"proxy -c{conns}")
        if t and p and p["rps"] and p["p50_us"] and p["cpu_us_per_req"]:
            lines.append(
                f"| -c{conns} | {t['rps'] / p['rps']:.3f} | {t['p50_us'] / p['p50_us']:.3f} | "
                f"{t['cpu_us_per_req'] / p['cpu_us_per_req']:.3f} |"
            )
    od = r["original_dst"]
    lines += [
        "",
        (
            f"SO_ORIGINAL_DST lookup: {od['so_original_dst_us']:.2f} µs per call "
            f"(getsockname on the same socket: {od['getsockname_us']:.2f} µs)."
        ),
        f"Checks (server sidecar counted of 10+ requests): {r['checks']}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="2 repetitions x 3 s")
    g.add_argument("--smoke", action="store_true", help="1 repetition x 1 s, -c50 only")
    ap.add_argument("--out-dir", type=Path, default=RESULTS, help="where results go")
    args = ap.parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    reps, seconds = {"smoke": (1, 1), "quick": (2, 3), "full": (3, 10)}[mode]
    conns = [50] if args.smoke else [1, 50]
    try:
        res = run(reps, seconds, conns)
    except BenchError as exc:
        print(f"bench/transparent.py: {exc}", file=sys.stderr)
        return 1
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
        cwd=HERE,
    ).stdout.strip()
    date = dt.datetime.now().strftime("%Y-%m-%d-%H%M")
    report = {
        "date": date, "mode": mode, "commit": commit, "reps": reps, "seconds": seconds,
        "connections": conns, "summary": summarize(res["samples"]), **res,
    }  # fmt: skip
    out: Path = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    suffix = "" if mode == "full" else f"-{mode}"
    (out / f"{date}-transparent{suffix}.json").write_text(json.dumps(report, indent=2))
    md = markdown(report)
    (out / f"{date}-transparent{suffix}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
