"""The cost of mutual TLS between diktyo sidecars: requests per second, CPU per request and
latency of a local mesh (client sidecar -> server sidecar -> nginx) with and without mTLS, with
and without connection reuse, measured interleaved in one run.

    .venv/bin/python bench/mtls.py            # full: 3 repetitions x 10 s per cell
    .venv/bin/python bench/mtls.py --quick    # 2 repetitions x 3 s
    .venv/bin/python bench/mtls.py --smoke    # 1 repetition x 1 s, -c50 only (tests/bench)
    .venv/bin/python bench/mtls.py --quick --ab 6d5c389 --conns 50   # A/B: REV vs the tree,
        # alternated (REV, tree, REV, tree: --rounds), one results file with both

``--commit REV`` benchmarks diktyo as committed at REV (``src/`` exported with git archive and
put first on PYTHONPATH for the control plane and every sidecar). ``--configs`` and ``--conns``
pick cells.

A mesh is started in-process (``MeshThread``): workload ``hello`` runs a one-worker nginx
(``return 200``) on its ``$PORT``; workload ``bench-client`` is ``diktyo.samples.sleep``. wrk
sends ``GET /`` with ``Host: hello:9080`` to the client sidecar's outbound listener, so every
request crosses both sidecars. Configurations (a DestinationRule for host ``hello``, applied with
``apply_text`` and ``wait_synced`` between cells):

- ``mtls``: no DestinationRule, auto mTLS (the default);
- ``plain``: ``trafficPolicy.tls.mode: DISABLE``;
- ``mtls-noreuse``: ``connectionPool.http.maxRequestsPerConnection: 1`` (a TLS handshake per
  request between the sidecars);
- ``plain-noreuse``: both.

Both sidecars are pinned to core 0 (``taskset -a -p``), wrk, the nginx upstream, the idle client
app and this process to core 1. CPU is utime+stime from /proc/PID/stat (sidecar process trees)
and, finer, schedstat. Results: ``bench/results/<date>-mtls[-quick|-smoke].json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
# --commit REV: the exported src of REV (also on PYTHONPATH for the sidecars), else this tree's
sys.path.insert(0, os.environ.get("DIKTYO_BENCH_SRC") or str(HERE.parent / "src"))

from configs import upstream_nginx_conf  # noqa: E402
from procs import LOAD_CORE, PROXY_CORE, cpu_seconds, sched_ns, tree  # noqa: E402

from diktyo.platform.harness import MeshThread  # noqa: E402

LUA = HERE / "report.lua"
RESULTS = HERE / "results"
HOST = "hello:9080"

DR_NAME = "hello-bench"
_DR_HEAD = f"""apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: {DR_NAME}, namespace: default}}
spec:
  host: hello
  trafficPolicy:
"""
CONFIGS: dict[str, str | None] = {
    "mtls": None,
    "plain": _DR_HEAD + "    tls: {mode: DISABLE}\n",
    "mtls-noreuse": _DR_HEAD + "    connectionPool: {http: {maxRequestsPerConnection: 1}}\n",
    "plain-noreuse": _DR_HEAD
    + "    tls: {mode: DISABLE}\n    connectionPool: {http: {maxRequestsPerConnection: 1}}\n",
}


class BenchError(RuntimeError):
    """The benchmark cannot run or measure; the message says why and what to do."""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------- mesh setup


def write_mesh(tmp: Path) -> Path:
    """The mesh file: ``hello`` (nginx on $PORT) and ``bench-client`` (idle sleep app)."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        raise BenchError("nginx is not installed: apt-get install -y nginx")
    # the conf is written with a placeholder port; the workload's shell fills in $PORT
    (tmp / "upstream.conf.in").write_text(
        upstream_nginx_conf(tmp, 54321).replace("54321", "@PORT@")
    )
    script = (
        f'sed "s/@PORT@/$PORT/" {tmp}/upstream.conf.in > {tmp}/upstream.conf && '
        f"exec {nginx} -p {tmp} -c {tmp}/upstream.conf"
    )
    spec = tmp / "mesh.yaml"
    spec.write_text(
        f"""name: mtls-bench
capture: proxy
services:
  - name: hello
    ports: [{{name: http, port: 9080}}]
workloads:
  - name: hello
    labels: {{app: hello, version: v1}}
    serviceAccount: hello-sa
    command: {json.dumps(["/bin/sh", "-c", script])}
  - name: bench-client
    labels: {{app: bench-client}}
    serviceAccount: client-sa
    command: {json.dumps([sys.executable, "-m", "diktyo.samples.sleep"])}
"""
    )
    return spec


def workload(mesh: MeshThread, name: str) -> dict[str, Any]:
    return next(w for w in mesh.describe()["workloads"] if w["workload"] == name)


def pin(pid: int, core: int) -> bool:
    """Pin every thread of ``pid``'s process tree to ``core``; False if taskset is missing."""
    if not shutil.which("taskset") or (os.cpu_count() or 1) <= core:
        return False
    for p in tree(pid):
        subprocess.run(
            ["taskset", "-a", "-p", "-c", str(core), str(p)], capture_output=True, check=False
        )
    return True


def proxied_get(port: int, timeout: float = 5.0) -> tuple[int, bytes]:
    """``GET /`` with ``Host: hello:9080`` to the outbound listener: (status, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(f"GET / HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    parts = head.split(b" ", 2)
    return (int(parts[1]) if len(parts) > 1 else 0), body


def security_policies(admin_port: int) -> dict[str, float]:
    """``connection_security_policy`` -> request count from the server sidecar's metrics."""
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{admin_port}/stats/prometheus", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for ln in text.splitlines():
        if ln.startswith("istio_requests_total{") and 'reporter="destination"' in ln:
            pol = ln.split('connection_security_policy="', 1)[1].split('"', 1)[0]
            out[pol] = out.get(pol, 0.0) + float(ln.rsplit(" ", 1)[1])
    return out


def handshakes(admin_port: int) -> tuple[float, float]:
    """The server sidecar's inbound (handshakes, resumed) counters (0, 0 before they existed)."""
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{admin_port}/stats/prometheus", timeout=5) as r:
        text = r.read().decode()
    got = {"envoy_listener_ssl_handshake": 0.0, "envoy_listener_ssl_session_reused": 0.0}
    for ln in text.splitlines():
        name = ln.split(" ", 1)[0]
        if name in got:
            got[name] = float(ln.rsplit(" ", 1)[1])
    return got["envoy_listener_ssl_handshake"], got["envoy_listener_ssl_session_reused"]


NUDGE = """apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: bench-nudge-{n}, namespace: default}}
spec:
  host: nothing.example
"""


def check_policy(port: int, admin_port: int, cfg: str) -> str:
    """Send 10 requests; the connection_security_policy the server sidecar counted most."""
    time.sleep(1.0)  # requests still queued from the last cell finish first
    before = security_policies(admin_port)
    for _ in range(10):
        status, _ = proxied_get(port)
        if status != 200:
            raise BenchError(f"{cfg}: check request answered {status}")
    time.sleep(0.3)
    after = security_policies(admin_port)
    grew = {k: v - before.get(k, 0.0) for k, v in after.items() if v > before.get(k, 0.0)}
    log(f"{cfg}: server sidecar counted {grew} for 10 check requests")
    return max(grew, key=lambda k: grew[k]) if grew else "unknown"


# ---------------------------------------------------------------------------------- load


def wrk(port: int, connections: int, seconds: int) -> dict[str, Any]:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-H", f"Host: {HOST}"]
    argv += ["-s", str(LUA), f"http://127.0.0.1:{port}/"]
    if shutil.which("taskset") and (os.cpu_count() or 1) > LOAD_CORE:
        argv = ["taskset", "-c", str(LOAD_CORE), *argv]
    out = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=seconds + 30)
    for line in out.stdout.splitlines():
        if line.startswith("WRKJSON "):
            res: dict[str, Any] = json.loads(line[8:])
            dur = res["duration_us"] / 1e6
            res["rps"] = res["requests"] / dur if dur else 0.0
            res["error_count"] = sum(res["errors"].values())
            return res
    raise BenchError(f"wrk gave no result (exit {out.returncode}): {out.stderr[-400:]}")


def measure(port: int, conns: int, seconds: int, pids: dict[str, int]) -> dict[str, Any]:
    trees = {k: tree(p) for k, p in pids.items()}
    cpu0 = {k: cpu_seconds(t) for k, t in trees.items()}
    ns0 = {k: sched_ns(t) for k, t in trees.items()}
    res = wrk(port, conns, seconds)
    cpu1 = {k: cpu_seconds(t) for k, t in trees.items()}
    ns1 = {k: sched_ns(t) for k, t in trees.items()}
    n = max(1, res["requests"])
    sample: dict[str, Any] = {
        "rps": res["rps"],
        "requests": res["requests"],
        "errors": res["error_count"],
        "p50_us": res["latency_us"]["p50"],
        "p99_us": res["latency_us"]["p99"],
    }
    for k in pids:
        sample[f"cpu_us_per_req_{k}"] = (cpu1[k] - cpu0[k]) * 1e6 / n
        sample[f"sched_us_per_req_{k}"] = (ns1[k] - ns0[k]) / 1e3 / n
    sample["cpu_us_per_req"] = sum(sample[f"cpu_us_per_req_{k}"] for k in pids)
    sample["sched_us_per_req"] = sum(sample[f"sched_us_per_req_{k}"] for k in pids)
    dur = res["duration_us"] / 1e6 or 1.0
    sample["sidecars_util"] = sum(ns1[k] - ns0[k] for k in pids) / 1e9 / dur
    return sample


# ---------------------------------------------------------------------------------- run


def run(
    reps: int, seconds: int, conns_list: list[int], out: Path, budget: float, warmup: bool
) -> dict[str, Any]:
    start = time.monotonic()
    if not shutil.which("wrk"):
        raise BenchError("wrk is not installed: apt-get install -y wrk")
    if (os.cpu_count() or 1) > LOAD_CORE:
        os.sched_setaffinity(0, {LOAD_CORE})  # this process (control plane thread) off core 0
    samples: list[dict[str, Any]] = []
    checks: dict[str, Any] = {}
    retries: list[dict[str, Any]] = []
    aborted = ""
    with tempfile.TemporaryDirectory(prefix="diktyo-mtls-") as td:
        tmp = Path(td)
        log("starting the mesh (control plane, hello = nginx, bench-client = sleep)")
        mesh_log = Path(tempfile.gettempdir()) / f"{out.name}-mesh.log"
        log_file = mesh_log.open("w", buffering=1)
        with MeshThread(write_mesh(tmp), start_timeout=60, out=log_file) as mesh:
            mesh.wait_synced()
            client, server = workload(mesh, "bench-client"), workload(mesh, "hello")
            port = int(client["outbound_port"])
            pids = {"client": int(client["sidecar_pid"]), "server": int(server["sidecar_pid"])}
            pinned = all(pin(p, PROXY_CORE) for p in pids.values())
            for app in (client["app_pid"], server["app_pid"]):
                if app:
                    pin(int(app), LOAD_CORE)
            log(f"sidecars {pids} pinned to core {PROXY_CORE}: {pinned}; outbound port {port}")
            status, body = proxied_get(port)
            if status != 200 or body.strip() != b"ok":
                raise BenchError(f"GET / Host: {HOST} via the outbound port gave {status} {body!r}")
            applied: str | None = None
            try:
                for rep in range(reps):
                    order = list(CONFIGS)
                    order = order[rep % len(order) :] + order[: rep % len(order)]  # rotate per rep
                    for cfg in order:
                        if time.monotonic() - start > budget:
                            log(f"time budget of {budget:g}s used up: stopping early")
                            break
                        text = CONFIGS[cfg]
                        if applied is not None and text != applied:
                            mesh.delete_text(applied)
                        if text is not None and text != applied:
                            mesh.apply_text(text)
                        applied = text
                        mesh.wait_synced()
                        if warmup:
                            wrk(port, 50, 1)  # new connections (and handshakes) outside the figures
                        want = "none" if cfg.startswith("plain") else "mutual_tls"
                        for attempt in range(4):
                            policy = check_policy(port, int(server["admin_port"]), cfg)
                            if policy == want:
                                break
                            # a sidecar may have rejected (NACKed) the snapshot: push a new one
                            log(f"{cfg}: check requests went {policy}, not {want}: pushing again")
                            retries.append({"config": cfg, "rep": rep, "seen": policy})
                            mesh.apply_text(NUDGE.format(n=attempt))
                            mesh.wait_synced()
                            mesh.delete_text(NUDGE.format(n=attempt))
                            mesh.wait_synced()
                        checks.setdefault(cfg, policy)
                        for conns in conns_list:
                            m0 = security_policies(int(server["admin_port"]))
                            h0 = handshakes(int(server["admin_port"]))
                            s = measure(port, conns, seconds, pids)
                            time.sleep(0.2)
                            m1 = security_policies(int(server["admin_port"]))
                            h1 = handshakes(int(server["admin_port"]))
                            s["handshakes_per_req"] = (h1[0] - h0[0]) / max(1, s["requests"])
                            s["resumed_share"] = (h1[1] - h0[1]) / max(1.0, h1[0] - h0[0])
                            d = {k: v - m0.get(k, 0.0) for k, v in m1.items()}
                            s["mtls_share"] = d.get("mutual_tls", 0.0) / max(1.0, sum(d.values()))
                            s.update(config=cfg, connections=conns, rep=rep, security_policy=policy)
                            samples.append(s)
                            log(
                                f"rep {rep + 1}/{reps} {cfg:14s} c{conns:<3d} {s['rps']:8.0f} rps  "
                                f"cpu {s['cpu_us_per_req']:6.0f} us/req (sched "
                                f"{s['sched_us_per_req']:6.0f})  p50 {s['p50_us'] / 1e3:6.2f} ms  "
                                f"p99 {s['p99_us'] / 1e3:6.2f} ms  err {s['errors']}  mTLS {s['mtls_share']:.0%}"
                            )
            except (OSError, BenchError, TimeoutError) as exc:
                aborted = f"{type(exc).__name__}: {exc}"
                log(f"aborted: {aborted}; mesh output: {mesh_log}; writing what was measured")
                tail = mesh_log.read_text()[-3000:] if mesh_log.exists() else ""
                print(tail, file=sys.stderr)

    log_file.close()
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": _commit(),
        "reps": reps,
        "seconds": seconds,
        "connections": conns_list,
        "layout": f"sidecars pinned to core {PROXY_CORE} (taskset -a -p); wrk, nginx upstream, "
        f"client app and the bench/control plane process on core {LOAD_CORE}",
        "security_policy_seen": checks,
        "resync": retries,
        "aborted": aborted,
        "samples": samples,
        "summary": summarize(samples),
    }
    result["ratios"] = ratios(result["summary"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_name(out.name + ".json").write_text(json.dumps(result, indent=1) + "\n")
    out.with_name(out.name + ".md").write_text(markdown(result))
    log(f"wrote {out}.json and .md ({time.monotonic() - start:.0f}s)")
    return result


FIELDS = (
    "rps",
    "cpu_us_per_req",
    "cpu_us_per_req_client",
    "cpu_us_per_req_server",
    "sched_us_per_req",
    "sched_us_per_req_client",
    "sched_us_per_req_server",
    "p50_us",
    "p99_us",
    "sidecars_util",
    "mtls_share",
    "handshakes_per_req",
    "resumed_share",
)


def summarize(samples: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Median of each figure per ``<config>/c<connections>``, plus min/max of rps and errors."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for s in samples:
        groups.setdefault(f"{s['config']}/c{s['connections']}", []).append(s)
    out: dict[str, dict[str, Any]] = {}
    for key, ss in groups.items():
        row: dict[str, Any] = {f: statistics.median(s.get(f, 0.0) for s in ss) for f in FIELDS}
        row["rps_min"] = min(s["rps"] for s in ss)
        row["rps_max"] = max(s["rps"] for s in ss)
        row["errors"] = sum(s["errors"] for s in ss)
        row["n"] = len(ss)
        out[key] = row
    return out


def ratios(summary: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """mTLS / plaintext (same reuse), and no-reuse / reuse (same security), per connections."""
    pairs = []
    for key in summary:
        cfg, c = key.split("/")
        if cfg.startswith("mtls"):
            plain = key.replace("mtls", "plain")
            pairs.append((f"{key} vs {plain}", key, plain))
        if cfg.endswith("-noreuse"):
            base = cfg.removesuffix("-noreuse")
            pairs.append((f"{key} vs {base}/{c}", key, f"{base}/{c}"))
    out: dict[str, dict[str, float]] = {}
    for name, a, b in pairs:
        if a in summary and b in summary:
            out[name] = {
                f: (summary[a][f] / summary[b][f] if summary[b][f] else float("nan"))
                for f in ("rps", "cpu_us_per_req", "sched_us_per_req", "p50_us", "p99_us")
            }
    return out


def markdown(r: dict[str, Any]) -> str:
    lines = [
        f"# Cost of mTLS between diktyo sidecars ({r['date']}, commit {r['commit']})",
        "",
        (
            f"{r['reps']} repetition(s) x {r['seconds']} s per cell, configurations interleaved; "
            f"{r['layout']}. wrk -t1 -> client sidecar outbound -> server sidecar inbound -> "
            "nginx. CPU: both sidecars, utime+stime (schedstat in brackets), per request; medians."
        ),
        "",
        (
            "Security policy of 10 check requests after each change (first repetition): "
            f"{r['security_policy_seen']}. mTLS share: of the requests of the measured wrk run, "
            "the share the server sidecar counted with connection_security_policy=mutual_tls."
        ),
        "",
        "| config | conns | rps (min-max) | CPU µs/req both (sched) | client | server | p50 ms | p99 ms | sidecars util | mTLS share | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, s in r["summary"].items():
        cfg, c = key.split("/")
        lines.append(
            f"| {cfg} | {c[1:]} | {s['rps']:.0f} ({s['rps_min']:.0f}-{s['rps_max']:.0f}) | "
            f"{s['cpu_us_per_req']:.0f} ({s['sched_us_per_req']:.0f}) | "
            f"{s['sched_us_per_req_client']:.0f} | {s['sched_us_per_req_server']:.0f} | "
            f"{s['p50_us'] / 1e3:.2f} | {s['p99_us'] / 1e3:.2f} | {s['sidecars_util'] * 100:.0f} % | "
            f"{s['mtls_share'] * 100:.0f} % | "
            f"{s['errors']} |"
        )
    lines += ["", "Client/server columns: schedstat µs per request of each sidecar.", ""]
    if r["aborted"]:
        lines += [
            f"**Run aborted early**: {r['aborted']} (figures above are what was measured).",
            "",
        ]
    lines += [
        "| ratio | rps | CPU/req | CPU/req (sched) | p50 | p99 |",
        "|---|---|---|---|---|---|",
    ]
    for name, q in r["ratios"].items():
        lines.append(
            f"| {name} | {q['rps']:.2f} | {q['cpu_us_per_req']:.2f} | {q['sched_us_per_req']:.2f} | "
            f"{q['p50_us']:.2f} | {q['p99_us']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def _commit() -> str:
    if os.environ.get("DIKTYO_BENCH_COMMIT"):
        return os.environ["DIKTYO_BENCH_COMMIT"]
    out = subprocess.run(
        ["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout.strip() or "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="2 repetitions x 3 s")
    mode.add_argument("--smoke", action="store_true", help="1 repetition x 1 s, -c50 only")
    ap.add_argument("--budget", type=float, default=None, help="stop after this many seconds")
    ap.add_argument("--out", default=None, help="results file stem (default <date>-mtls[-mode])")
    ap.add_argument("--out-dir", type=Path, default=RESULTS, help="where to write (bench/results)")
    ap.add_argument(
        "--configs",
        default=",".join(CONFIGS),
        help=f"comma-separated cells to run, of {', '.join(CONFIGS)} (default: all)",
    )
    ap.add_argument("--conns", default="", help="wrk connections, comma-separated (e.g. 50,1)")
    ap.add_argument("--commit", default="", help="benchmark diktyo as committed at REV")
    ap.add_argument(
        "--ab",
        default="",
        metavar="REV",
        help="A/B: run REV and this tree alternately (--rounds times each) and compare",
    )
    ap.add_argument("--rounds", type=int, default=2, help="rounds per side with --ab (default 2)")
    args = ap.parse_args(argv)
    unknown = [c for c in args.configs.split(",") if c not in CONFIGS]
    if unknown:
        ap.error(f"--configs: unknown {unknown}; choose from {list(CONFIGS)}")
    if args.ab:
        return ab_main(args, argv if argv is not None else sys.argv[1:])
    if args.commit and not os.environ.get("DIKTYO_BENCH_SRC"):
        return _reexec_at_commit(args.commit, argv if argv is not None else sys.argv[1:])
    for name in list(CONFIGS):
        if name not in args.configs.split(","):
            del CONFIGS[name]
    if args.smoke:
        reps, secs, conns, suffix = 1, 1, [50], "-smoke"
    elif args.quick:
        reps, secs, conns, suffix = 2, 3, [50, 1], "-quick"
    else:
        reps, secs, conns, suffix = 3, 10, [50, 1], ""
    if args.conns:
        conns = [int(c) for c in args.conns.split(",")]
    budget = args.budget or (reps * len(CONFIGS) * (len(conns) * (secs + 2) + 4) + 60)
    stem = args.out or time.strftime("%Y-%m-%d-%H%M", time.gmtime()) + f"-mtls{suffix}"
    try:
        res = run(reps, secs, conns, args.out_dir / stem, budget, warmup=not args.smoke)
    except BenchError as exc:
        print(f"mtls bench: {exc}", file=sys.stderr)
        return 1
    return 1 if res["aborted"] else 0


def _export(rev: str) -> tuple[str, Path]:
    root = HERE.parent
    commit = subprocess.run(
        ["git", "-C", str(root), "rev-parse", "--short", rev],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    dest = Path(tempfile.mkdtemp(prefix=f"diktyo-{commit}-"))
    # src plus what setup.py needs to compile REV's own hot path in place
    paths = ["src", "setup.py", "pyproject.toml", "README.md"]
    listed = subprocess.run(
        ["git", "-C", str(root), "ls-tree", "--name-only", commit],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    archive = subprocess.run(
        ["git", "-C", str(root), "archive", commit, *[p for p in paths if p in listed]],
        capture_output=True,
        check=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    _build_export(dest)
    return commit, dest


BUILDS: dict[str, str] = {}  # side -> diktyo._build.describe() of what it runs (--ab)
BUILD_TIMEOUT = 600.0  # mypyc over the hot-path group: ~1-2 min on this machine


def _build_export(dest: Path) -> None:
    """Compiles REV's own hot path in the export (``setup.py build_ext --inplace`` with this
    venv's Python, as ``make build`` does), so REV runs compiled from its own sources. If that
    fails, this tree's compiled modules are copied in instead: they run only where REV's
    hot-path sources are the ones this build was made from (``diktyo._build`` checks hashes),
    else REV runs pure Python. Either way the log says which build the old side runs."""
    if (dest / "setup.py").exists():
        log(f"building the export's hot path ({dest}; mypyc, ~1-2 min)")
        t0 = time.monotonic()
        try:
            out = subprocess.run(
                [sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
                cwd=dest,
                capture_output=True,
                text=True,
                check=False,
                timeout=BUILD_TIMEOUT,
            )
            ok, why = out.returncode == 0, (out.stderr or out.stdout).strip()[-400:]
        except subprocess.TimeoutExpired:
            ok, why = False, f"timed out after {BUILD_TIMEOUT:.0f}s"
        if ok:
            log(f"export built in {time.monotonic() - t0:.0f}s")
        else:
            log(f"building the export failed ({why}); copying this tree's compiled modules instead")
            _copy_build(HERE.parent / "src", dest / "src")
    else:
        log("the export has no setup.py; copying this tree's compiled modules instead")
        _copy_build(HERE.parent / "src", dest / "src")
    BUILDS["old"] = _describe(dest / "src")
    BUILDS["new"] = _describe(HERE.parent / "src")
    log(f"old side (export) runs: {BUILDS['old']}")
    log(f"new side (this tree) runs: {BUILDS['new']}")


def _describe(src: Path) -> str:
    """``diktyo._build.describe()`` as a fresh process importing ``src`` sees it."""
    out = subprocess.run(
        [sys.executable, "-c", "import diktyo._build as b; print(b.describe())"],
        env={**os.environ, "PYTHONPATH": str(src)},
        capture_output=True,
        text=True,
        check=False,
    )
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[-1] if lines else f"unknown (exit {out.returncode})"


def _copy_build(src: Path, dest: Path) -> None:
    """This tree's compiled extension modules and build record, copied into an export (the
    fallback when the export cannot be built): REV then runs compiled where its hot-path
    sources are the ones this build was made from (checked by source hash in
    ``diktyo._build``, as at every start) and pure Python otherwise."""
    for so in src.rglob("*.so"):
        target = dest / so.relative_to(src)
        if target.parent.is_dir():
            shutil.copy2(so, target)
    info = src / "diktyo" / "_build_info.json"
    if info.exists():
        shutil.copy2(info, dest / "diktyo" / "_build_info.json")


def _env_at(commit: str, dest: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(dest / "src") + (
        os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
    )
    env["DIKTYO_BENCH_SRC"] = str(dest / "src")
    env["DIKTYO_BENCH_COMMIT"] = commit
    return env


def _reexec_at_commit(rev: str, argv: list[str]) -> int:
    try:
        commit, dest = _export(rev)
    except subprocess.CalledProcessError as exc:
        print(f"mtls bench: --commit {rev}: {exc.stderr!r}", file=sys.stderr)
        return 2
    log(f"diktyo at commit {commit} (exported to {dest})")
    try:
        cmd = [sys.executable, str(Path(__file__).resolve()), *argv]
        return subprocess.run(cmd, env=_env_at(commit, dest), check=False).returncode
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def _strip(argv: list[str], *opts: str) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in opts:
            skip = True
            continue
        if any(a.startswith(o + "=") for o in opts):
            continue
        out.append(a)
    return out


def ab_main(args: argparse.Namespace, argv: list[str]) -> int:
    """REV and this tree alternately, ``--rounds`` each; medians of both in one file."""
    try:
        old, dest = _export(args.ab)
    except subprocess.CalledProcessError as exc:
        print(f"mtls bench: --ab {args.ab}: {exc.stderr!r}", file=sys.stderr)
        return 2
    new = _commit() + ("+dirty" if _dirty() else "")
    base = _strip(argv, "--ab", "--rounds", "--out", "--out-dir", "--commit")
    stem = args.out or time.strftime("%Y-%m-%d-%H%M", time.gmtime()) + "-mtls-ab"
    tmp = Path(tempfile.mkdtemp(prefix="diktyo-mtls-ab-"))
    runs: list[tuple[str, Path]] = []
    try:
        for r in range(args.rounds):
            for side, env in (("old", _env_at(old, dest)), ("new", dict(os.environ))):
                out = tmp / f"{side}-{r}"
                log(f"A/B round {r + 1}/{args.rounds}: {side} ({old if side == 'old' else new})")
                cmd = [sys.executable, str(Path(__file__).resolve()), *base]
                cmd += ["--out-dir", str(tmp), "--out", out.name]
                subprocess.run(cmd, env=env, check=False)
                if out.with_name(out.name + ".json").exists():
                    runs.append((side, out))
    finally:
        shutil.rmtree(dest, ignore_errors=True)
    samples: dict[str, list[dict[str, Any]]] = {"old": [], "new": []}
    for side, out in runs:
        samples[side] += json.loads(out.with_name(out.name + ".json").read_text())["samples"]
    summary = {side: summarize(ss) for side, ss in samples.items()}
    loadavg = Path("/proc/loadavg").read_text().split()[:3]
    lines = [
        f"# mTLS bench A/B: {old} (old) vs {new} (new), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        f"Alternated old/new, {args.rounds} round(s) each (`bench/mtls.py {' '.join(argv)}`); "
        f"load average at the end {' '.join(loadavg)}. Medians over all samples of each side; "
        "CPU = utime+stime of both sidecars per request.",
        "",
        f"Builds: old {BUILDS.get('old', '?')}; new {BUILDS.get('new', '?')}.",
        "",
        "| cell | old rps | new rps | old CPU µs/req (client+server) | new CPU µs/req (client+server) | new/old CPU | mTLS share old/new | inbound handshakes per request, resumed share (new) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key in summary["new"]:
        o, n = summary["old"].get(key), summary["new"][key]
        if o is None:
            continue
        lines.append(
            f"| {key} | {o['rps']:.0f} | {n['rps']:.0f} | {o['cpu_us_per_req']:.0f} "
            f"({o['cpu_us_per_req_client']:.0f}+{o['cpu_us_per_req_server']:.0f}) | "
            f"{n['cpu_us_per_req']:.0f} ({n['cpu_us_per_req_client']:.0f}+"
            f"{n['cpu_us_per_req_server']:.0f}) | {n['cpu_us_per_req'] / o['cpu_us_per_req']:.2f} | "
            f"{o['mtls_share']:.0%}/{n['mtls_share']:.0%} | "
            f"{n['handshakes_per_req']:.2f}, {n['resumed_share']:.0%} |"
        )
    lines += ["", "| ratio (same side) | old | new |", "|---|---|---|"]
    rat = {side: ratios(summary[side]) for side in summary}
    for name, q in rat["new"].items():
        if name in rat["old"]:
            lines.append(
                f"| {name}: CPU/req | {rat['old'][name]['cpu_us_per_req']:.2f} | "
                f"{q['cpu_us_per_req']:.2f} |"
            )
    text = "\n".join(lines) + "\n"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{stem}.md").write_text(text)
    (args.out_dir / f"{stem}.json").write_text(
        json.dumps(
            {"old": old, "new": new, "builds": BUILDS, "summary": summary, "samples": samples},
            indent=1,
        )
        + "\n"
    )
    print(text)
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


def _dirty() -> bool:
    out = subprocess.run(
        ["git", "-C", str(HERE), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        check=False,
    )
    return bool(out.stdout.strip())


if __name__ == "__main__":
    sys.exit(main())
