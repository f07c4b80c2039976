#!/usr/bin/env python3
"""diktyo's data-plane benchmark: the sidecar side by side with direct, nginx and HAProxy.

One run starts a fixed-response nginx upstream (core 1), then, for each repetition, every
target fresh (proxies on core 0), and measures each scenario on every target in turn
(interleaved, the order rotated per repetition). The load generator (wrk for saturation, the
paced ``pacer`` for fixed rates) runs on core 1 beside the upstream.

    python bench/run.py            # full: 3 repetitions x 10 s
    python bench/run.py --quick    # 1 repetition x 3 s
    python bench/run.py --smoke    # 1 s per scenario, direct + nginx only (the harness's test)

Results: bench/results/<date>-<mode>.json, .md, -latency.png, and bench/results/latest.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import idleconns
import loadgen
import procs
import report
import targets as tg

HERE = Path(__file__).resolve().parent

# name -> (kind, path, connections or rate, paced connections)
SCENARIOS: dict[str, dict[str, Any]] = {
    "sat-c1-small": {"kind": "wrk", "path": "/", "connections": 1},
    "sat-c1-1k": {"kind": "wrk", "path": "/1k", "connections": 1},
    "sat-c50-small": {"kind": "wrk", "path": "/", "connections": 50},
    "sat-c50-1k": {"kind": "wrk", "path": "/1k", "connections": 50},
    "rate-1000": {"kind": "paced", "path": "/", "rate": 1000, "connections": 1},
    "rate-5000": {"kind": "paced", "path": "/", "rate": 5000, "connections": 5},
}
SMOKE_RATES = {"rate-1000": 200, "rate-5000": 500}

APT_HINT = "apt-get install -y nginx haproxy wrk gcc"


def check_tools() -> list[str]:
    missing = [t for t in ("nginx", "haproxy", "wrk", "taskset") if shutil.which(t) is None]
    if shutil.which("gcc") is None and shutil.which("cc") is None:
        missing.append("gcc")
    return missing


def _cmd(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=10)
        return (out.stdout + out.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "?"


def machine_info() -> dict[str, Any]:
    def mod_version(name: str) -> str:
        try:
            from importlib.metadata import version

            return version(name)
        except Exception:  # noqa: BLE001 - any failure: version unknown
            return "?"

    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "uvloop": mod_version("uvloop"),
        "httptools": mod_version("httptools"),
        "diktyo": mod_version("diktyo"),
        "diktyo_commit": os.environ.get("DIKTYO_BENCH_COMMIT")
        or _cmd(["git", "-C", str(HERE.parent), "rev-parse", "--short", "HEAD"])
        + " + working tree",
        "nginx": _cmd(["nginx", "-v"]),
        "haproxy": _cmd(["haproxy", "-v"]),
        "wrk": _cmd(["wrk", "-v"]),
        "gcc": _cmd(["gcc", "--version"]),
        "loadavg_start": Path("/proc/loadavg").read_text().split()[:3],
    }


def _reexec_at_commit(rev: str) -> int:
    """Export ``src/`` at ``rev`` and run this benchmark again with it first on PYTHONPATH, so
    the translator and every sidecar run the committed code."""
    root = HERE.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", rev],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except subprocess.CalledProcessError as exc:
        print(f"bench: --commit {rev}: {exc.stderr.strip()}", file=sys.stderr)
        return 2
    dest = Path(tempfile.mkdtemp(prefix=f"diktyo-{commit}-"))
    archive = subprocess.run(
        ["git", "-C", str(root), "archive", commit, "src"], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(dest / "src") + (
        os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
    )
    env["DIKTYO_BENCH_SRC"] = str(dest / "src")
    env["DIKTYO_BENCH_COMMIT"] = commit
    print(f"bench: diktyo at commit {commit} (exported to {dest})", file=sys.stderr)
    try:
        return subprocess.run([sys.executable, *sys.argv], env=env, check=False).returncode
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def compile_diktyo() -> None:
    """Byte-compile the diktyo package the sidecars will import: with stale or missing ``.pyc``
    files (an edited tree, ``PYTHONDONTWRITEBYTECODE``) every sidecar compiles its sources at
    start, which costs it ~1.5 MiB of idle RSS that an installed sidecar does not pay."""
    import compileall
    import importlib.util

    spec = importlib.util.find_spec("diktyo")
    for d in (spec.submodule_search_locations or []) if spec else []:
        compileall.compile_dir(d, quiet=1, workers=1)


def measure(
    sc: dict[str, Any],
    port: int,
    run: tg.Running,
    upstream: procs.Proc,
    seconds: float,
    pacer: Path | None,
) -> dict[str, Any]:
    ps = [pid for p in run.procs for pid in p.pids()]
    ns0, sys0 = procs.sched_ns(ps), procs.sys_seconds(ps)
    cpu0, up0, cores0, t0 = (
        procs.cpu_seconds(ps),
        upstream.cpu(),
        procs.core_busy(),
        time.monotonic(),
    )
    if sc["kind"] == "wrk":
        res = loadgen.wrk(port, sc["path"], sc["connections"], seconds)
    else:
        assert pacer is not None
        res = loadgen.pacer(pacer, port, sc["path"], sc["rate"], seconds, sc["connections"])
    wall = time.monotonic() - t0
    cpu = procs.cpu_seconds(ps) - cpu0
    ns = procs.sched_ns(ps) - ns0
    res["proxy_sys_share"] = (procs.sys_seconds(ps) - sys0) / cpu if cpu > 0 else None
    cores1 = procs.core_busy()
    n = max(1, res["requests"])
    res["proxy_cpu_s"] = cpu
    res["cpu_us_per_req"] = cpu * 1e6 / n if run.procs else None
    res["cpu_us_per_req_schedstat"] = ns / 1e3 / n if run.procs else None
    res["proxy_cpu_util"] = cpu / res["seconds"] if res["seconds"] else 0.0
    res["upstream_cpu_util"] = (upstream.cpu() - up0) / res["seconds"] if res["seconds"] else 0.0
    res["core_busy"] = {
        str(c): round((cores1[c][0] - b0) / max(1, cores1[c][1] - tot0), 3)
        for c, (b0, tot0) in cores0.items()
        if c in cores1
    }
    res["wall_s"] = wall
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="1 repetition x 3 s per scenario")
    mode.add_argument(
        "--smoke",
        action="store_true",
        help="1 s per scenario, direct + nginx, low paced rates: checks the harness works",
    )
    ap.add_argument("--targets", help=f"comma-separated subset of {','.join(tg.ALL_TARGETS)}")
    ap.add_argument("--scenarios", help=f"comma-separated subset of {','.join(SCENARIOS)}")
    ap.add_argument("--reps", type=int, help="repetitions (default: full 3, quick 1)")
    ap.add_argument(
        "--seconds", type=float, help="seconds per measurement (default: full 10, quick 3)"
    )
    ap.add_argument(
        "--diktyo-config",
        choices=("yaml", "snapshot"),
        default="yaml",
        help="diktyo's config: Istio YAML translated by diktyo (default) or the hand-written snapshot",
    )
    ap.add_argument(
        "--commit",
        metavar="REV",
        help="benchmark diktyo as committed at REV (e.g. HEAD; exported with git archive), "
        "not the working tree that others may be editing",
    )
    ap.add_argument(
        "--idle-conns",
        type=int,
        help="idle keep-alive connections opened per proxy for the RSS-per-connection figure "
        "(default: 1000; smoke 200; 0 = skip)",
    )
    ap.add_argument(
        "--mtls-json",
        type=Path,
        metavar="FILE",
        help="a bench/mtls.py result (JSON) whose figures fill the issue-11 mTLS rows; "
        "without it they say 'not measured in this run'",
    )
    ap.add_argument("--out", type=Path, default=HERE / "results", help="results directory")
    ap.add_argument("--no-latest", action="store_true", help="do not overwrite <out>/latest.md")
    args = ap.parse_args(argv)
    if args.commit and not os.environ.get("DIKTYO_BENCH_SRC"):
        return _reexec_at_commit(args.commit)

    missing = check_tools()
    if missing:
        print(
            f"bench: missing tools: {', '.join(missing)}. Install them with:\n  {APT_HINT}",
            file=sys.stderr,
        )
        return 2

    mode_name = "smoke" if args.smoke else "quick" if args.quick else "full"
    reps = args.reps or (3 if mode_name == "full" else 1)
    seconds = args.seconds or {"full": 10.0, "quick": 3.0, "smoke": 1.0}[mode_name]
    wanted = (
        args.targets.split(",")
        if args.targets
        else (["direct", "nginx"] if args.smoke else list(tg.ALL_TARGETS))
    )
    for t in wanted:
        if t not in tg.ALL_TARGETS:
            ap.error(f"unknown target {t!r}; choose from {', '.join(tg.ALL_TARGETS)}")
    scen_names = args.scenarios.split(",") if args.scenarios else list(SCENARIOS)
    for s in scen_names:
        if s not in SCENARIOS:
            ap.error(f"unknown scenario {s!r}; choose from {', '.join(SCENARIOS)}")
    scenarios = {}
    for s in scen_names:
        sc = dict(SCENARIOS[s])
        if args.smoke and s in SMOKE_RATES:
            sc["rate"] = SMOKE_RATES[s]
        scenarios[s] = sc

    notes: list[str] = []
    n_idle = args.idle_conns if args.idle_conns is not None else (200 if args.smoke else 1000)
    mtls = None
    if args.mtls_json:
        try:
            mtls = json.loads(args.mtls_json.read_text())
        except (OSError, ValueError) as exc:
            ap.error(f"--mtls-json {args.mtls_json}: {exc}")
    if any(t in tg.DIKTYO_TARGETS for t in wanted):
        ok, why = tg.diktyo_sidecar_available()
        if not ok:
            notes.append(f"diktyo targets skipped: {why}")
            print(f"bench: {notes[-1]}", file=sys.stderr)
            wanted = [t for t in wanted if t not in tg.DIKTYO_TARGETS]

    if any(t in tg.DIKTYO_TARGETS for t in wanted):
        compile_diktyo()
    tmp = Path(tempfile.mkdtemp(prefix="diktyo-bench-"))
    pacer = loadgen.build_pacer(tmp / "build")
    if pacer is None:
        notes.append(
            "paced scenarios skipped: no C compiler to build bench/pacer.c (apt-get install gcc)"
        )
        scenarios = {k: v for k, v in scenarios.items() if v["kind"] != "paced"}

    started = dt.datetime.now(dt.UTC)
    info = machine_info()
    print(
        f"bench: {mode_name}: {reps} x {seconds:g} s, targets {', '.join(wanted)}; "
        f"proxies on core {procs.PROXY_CORE}, upstream + load generator on core {procs.LOAD_CORE}",
        file=sys.stderr,
    )
    upstream = tg.start_upstream(tmp, procs.LOAD_CORE)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        t: {s: [] for s in scenarios} for t in wanted
    }
    memory: dict[str, dict[str, list[Any]]] = {
        t: {"idle_rss_kib": [], "peak_rss_kib": []} for t in wanted
    }
    failures: dict[str, str] = {}
    sidecar_stats: dict[str, list[dict[str, int]]] = {}
    compiled: dict[str, bool] = {}  # diktyo sidecar -> ran the compiled hot path (else pure)
    try:
        for rep in range(reps):
            running: dict[str, tg.Running] = {}
            for t in wanted:
                if t in failures:
                    continue
                try:
                    running[t] = tg.start_target(t, tmp, upstream, args.diktyo_config)
                except Exception as exc:  # noqa: BLE001 - a target that cannot start is reported
                    failures[t] = f"{type(exc).__name__}: {exc}"
                    print(f"bench: {t} failed to start: {exc}", file=sys.stderr)
            time.sleep(0.5)
            for t, r in running.items():
                memory[t]["idle_rss_kib"].append(sum(p.rss_kib() for p in r.procs))
            for t, r in running.items():  # warm up pools and caches
                try:
                    loadgen.wrk(r.port, "/", 10, 1)
                except loadgen.LoadError as exc:
                    failures[t] = f"warm-up failed: {exc}"
            order = [t for t in running if t not in failures]
            k = rep % max(1, len(order))
            order = order[k:] + order[:k]
            for sname, sc in scenarios.items():
                for t in order:
                    r = running[t]
                    try:
                        res = measure(sc, r.port, r, upstream, seconds, pacer)
                    except Exception as exc:  # noqa: BLE001 - recorded in the results
                        res = {"error": f"{type(exc).__name__}: {exc}"}
                    res["rep"] = rep
                    runs[t][sname].append(res)
                    print(
                        f"bench: rep {rep + 1}/{reps} {sname:14s} {t:13s} " + report.one_line(res),
                        file=sys.stderr,
                    )
            for t, r in running.items():
                memory[t]["peak_rss_kib"].append(sum(p.hwm_kib() for p in r.procs))
                if r.procs and n_idle > 0:  # after the peak: the connections raise VmHWM
                    try:
                        conns = idleconns.measure(r.port, r.procs, n_idle)
                    except Exception as exc:  # noqa: BLE001 - recorded in the results
                        conns = {"error": f"{type(exc).__name__}: {exc}"}
                    memory[t].setdefault("idle_conns", []).append(conns)
                    print(
                        f"bench: rep {rep + 1}/{reps} idle conns     {t:13s} "
                        + (
                            conns["error"][:200]
                            if "error" in conns
                            else f"{conns['downstream']['bytes_per_conn']:,.0f} B per client conn, "
                            f"{conns['with_upstream']['bytes_per_conn']:,.0f} B with upstream "
                            f"({n_idle} connections)"
                        ),
                        file=sys.stderr,
                    )
                for p in r.procs:
                    if "compiled" in p.extra:  # the sidecar's ready line: mypyc hot path or not
                        compiled[p.name] = bool(p.extra["compiled"])
                    if "admin" in p.extra:
                        counts = procs.istio_request_counts(int(p.extra["admin"]))  # type: ignore[call-overload]
                        sidecar_stats.setdefault(p.name, []).append(counts)
                r.stop()
    finally:
        upstream.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    info["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    result = {
        "mode": mode_name,
        "date": started.isoformat(timespec="seconds"),
        "reps": reps,
        "seconds": seconds,
        "cores": {"proxy": procs.PROXY_CORE, "upstream_and_load": procs.LOAD_CORE},
        "machine": info,
        "scenarios": scenarios,
        "targets": wanted,
        "diktyo_config": args.diktyo_config,
        "failures": failures,
        "notes": notes,
        "runs": runs,
        "memory": memory,
        "sidecar_requests": sidecar_stats,
        "diktyo_compiled": compiled,
        "idle_conns": n_idle,
    }
    if mtls is not None:
        result["mtls"] = mtls
    result["summary"] = report.summarise(result)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{started.strftime('%Y-%m-%d-%H%M')}-{mode_name}"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    chart = report.chart(result, args.out / f"{stem}-latency.png")
    if chart is None and any(v["kind"] == "paced" for v in scenarios.values()):
        print(
            "bench: no latency chart: matplotlib is missing (pip install -e '.[bench]')",
            file=sys.stderr,
        )
    md = report.markdown(result, chart.name if chart else None)
    (args.out / f"{stem}.md").write_text(md)
    if not args.no_latest:
        (args.out / "latest.md").write_text(md)
    print(md)
    for name, c in sorted(compiled.items()):
        print(f"bench: {name} ran {'compiled (mypyc)' if c else 'pure Python'}", file=sys.stderr)
    print(f"bench: wrote {args.out / stem}.json and .md", file=sys.stderr)
    return 1 if failures and len(failures) == len(wanted) else 0


if __name__ == "__main__":
    sys.exit(main())
