"""Benchmark results: medians and spread per target and scenario, ratios paired within a run,
the issue's targets checked, a Markdown report and a latency chart."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

PCTS = ("p50", "p90", "p99", "p999")
GOALS = {
    "sat_rps_vs_haproxy": ">= 0.5x HAProxy rps at saturation (wrk -c50, small body), one core",
    "sat_capacity_vs_haproxy": (
        "same, from CPU per request at saturation (requests per proxy CPU-second: robust to "
        "other tenants taking CPU from the proxy's core)"
    ),
    "cpu_at_1000": "< 100 us CPU per request at 1,000 rps",
    "mesh_added_p99": "mesh-path added p99 at 1,000 rps <= 1.5x two HAProxy hops",
    "idle_rss": "sidecar idle RSS < 40 MiB",
}


def one_line(res: dict[str, Any]) -> str:
    if "error" in res:
        return "ERROR " + res["error"][:200]
    lat = res["latency_us"]
    cpu = res.get("cpu_us_per_req")
    return (
        f"{res['rps']:9.0f} rps  cpu {cpu if cpu is None else round(cpu, 1)!s:>6} us/req "
        f"(proxy {res['proxy_cpu_util']:.0%})  p50 {lat['p50']:.0f} p99 {lat['p99']:.0f} "
        f"p99.9 {lat['p999']:.0f} us  errors {res['error_count']}"
    )


def _spread(values: list[float]) -> dict[str, float] | None:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def _metric(res: dict[str, Any], key: str) -> float | None:
    if "error" in res:
        return None
    if key in PCTS:
        return float(res["latency_us"][key])
    if key == "rps_per_cpu_s":
        cpu = res.get("cpu_us_per_req")
        return 1e6 / cpu if cpu else None
    if key == "load_core_busy":
        v = res.get("core_busy", {}).get("1")
        return None if v is None else float(v)
    v = res.get(key)
    return None if v is None else float(v)


def _by_rep(runs: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {r["rep"]: r for r in runs if "error" not in r}


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    runs = result["runs"]
    out: dict[str, Any] = {"targets": {}, "ratios": {}, "goals": {}}
    for t, per in runs.items():
        out["targets"][t] = {}
        for s, rs in per.items():
            m = {
                k: _spread([_metric(r, k) for r in rs])
                for k in (
                    "rps",
                    "cpu_us_per_req",
                    "cpu_us_per_req_schedstat",
                    "rps_per_cpu_s",
                    "proxy_sys_share",
                    "proxy_cpu_util",
                    "load_core_busy",
                    "error_count",
                    *PCTS,
                )
            }
            # added latency vs direct, paired by repetition
            direct = _by_rep(runs.get("direct", {}).get(s, []))
            for p in ("p50", "p99"):
                m[f"added_{p}"] = (
                    _spread(
                        [
                            r["latency_us"][p] - direct[r["rep"]]["latency_us"][p]
                            for r in rs
                            if "error" not in r and r["rep"] in direct
                        ]
                    )
                    if t != "direct"
                    else None
                )
            out["targets"][t][s] = m
        mem = result["memory"].get(t, {})
        out["targets"][t]["memory"] = {
            k: _spread([v / 1024 for v in mem.get(k, [])]) for k in ("idle_rss_kib", "peak_rss_kib")
        }
        conns = [c for c in mem.get("idle_conns", []) if "error" not in c]
        out["targets"][t]["memory"]["idle_conn_bytes"] = _spread(
            [c["downstream"]["bytes_per_conn"] for c in conns]
        )
        out["targets"][t]["memory"]["idle_conn_with_upstream_bytes"] = _spread(
            [c["with_upstream"]["bytes_per_conn"] for c in conns]
        )

    def ratio(a: str, b: str, s: str, key: str, added: bool = False) -> dict[str, float] | None:
        ra, rb = _by_rep(runs.get(a, {}).get(s, [])), _by_rep(runs.get(b, {}).get(s, []))
        direct = _by_rep(runs.get("direct", {}).get(s, []))
        vals = []
        for rep in ra.keys() & rb.keys():
            x, y = _metric(ra[rep], key), _metric(rb[rep], key)
            if added:
                if rep not in direct:
                    continue
                d = _metric(direct[rep], key)
                x, y = (
                    (x - d, y - d)
                    if x is not None and y is not None and d is not None
                    else (None, None)
                )
            if x is not None and y:
                vals.append(x / y)
        return _spread(vals)

    pairs = [
        ("diktyo", "haproxy"),
        ("diktyo", "nginx"),
        ("bare", "haproxy"),
        ("diktyo", "bare"),
        ("mesh-diktyo", "mesh-haproxy"),
        (CONCURRENCY_TARGET, "diktyo"),
    ]
    scen = list(dict.fromkeys(sc for per in runs.values() for sc in per))  # every target's
    for a, b in pairs:
        if a not in runs or b not in runs:
            continue
        out["ratios"][f"{a}/{b}"] = {
            s: {
                "rps": ratio(a, b, s, "rps"),
                "cpu_us_per_req": ratio(a, b, s, "cpu_us_per_req"),
                "rps_per_cpu_s": ratio(a, b, s, "rps_per_cpu_s"),
                "p99": ratio(a, b, s, "p99"),
                "added_p99": ratio(a, b, s, "p99", added=True),
            }
            for s in scen
        }

    def med(t: str, s: str, k: str) -> float | None:
        v = out["targets"].get(t, {}).get(s, {}).get(k)
        return None if v is None else v["median"]

    def goal(
        value: float | None, limit: float, higher_is_better: bool, unit: str
    ) -> dict[str, Any]:
        if value is None:
            return {"value": None, "limit": limit, "met": None, "note": "not measured"}
        met = value >= limit if higher_is_better else value <= limit
        if met:
            note = "met"
        elif higher_is_better:
            note = f"missed by {limit - value:.2f}{unit} ({value / limit:.0%} of the target)"
        else:
            note = f"missed by {value - limit:.1f}{unit} ({value / limit:.2f}x the limit)"
        return {"value": value, "limit": limit, "met": met, "note": note}

    r = out["ratios"].get("diktyo/haproxy", {}).get("sat-c50-small", {}) or {}
    out["goals"]["sat_rps_vs_haproxy"] = goal(
        r["rps"]["median"] if r.get("rps") else None, 0.5, True, "x"
    )
    out["goals"]["sat_capacity_vs_haproxy"] = goal(
        r["rps_per_cpu_s"]["median"] if r.get("rps_per_cpu_s") else None, 0.5, True, "x"
    )
    out["goals"]["cpu_at_1000"] = goal(
        med("diktyo", "rate-1000", "cpu_us_per_req"), 100.0, False, " us"
    )
    m = out["ratios"].get("mesh-diktyo/mesh-haproxy", {}).get("rate-1000", {}) or {}
    out["goals"]["mesh_added_p99"] = goal(
        m["added_p99"]["median"] if m.get("added_p99") else None, 1.5, False, "x"
    )
    mem = out["targets"].get("diktyo", {}).get("memory", {}).get("idle_rss_kib")
    out["goals"]["idle_rss"] = goal(mem["median"] if mem else None, 40.0, False, " MiB")
    out["issue11"] = issue11_targets(result, out)
    return out


# issue 11's targets: (key, figure, target text). Rows whose data this run lacks say so.
ISSUE11 = (
    ("sat_small", "saturation rps, wrk -c50, small body", ">= 0.8x HAProxy 1 thread"),
    ("sat_1k", "saturation rps, wrk -c50, 1 KiB body", ">= 0.8x HAProxy 1 thread"),
    ("cpu_1000", "CPU per request at paced 1,000 rps", "<= 1.5x HAProxy's"),
    ("idle_rss", "idle RSS (diktyo sidecar --snapshot, bench config)", "<= 30 MB"),
    ("rss_per_conn", "RSS per idle keep-alive client connection", "<= 4 KB"),
    ("mtls_reuse", "mTLS between two sidecars, connections reused, -c50: CPU/request", "<= 1.3x plaintext"),
    ("mtls_resumption", "mTLS, one request per connection: new-connection CPU", "halved by TLS session resumption"),
    ("concurrency2", "concurrency: 2 on 2 cores, saturation rps", ">= 1.8x one worker"),
)  # fmt: skip
# the target name a `concurrency: 2` diktyo gets in run.py (added with the workers feature)
CONCURRENCY_TARGET = "diktyo-c2"
MB = 1e6  # the issue's MB and KB are decimal; the tables show MiB / bytes beside them


def _row(
    value: float | None, limit: float, higher_is_better: bool, shown: str, why_absent: str
) -> dict[str, Any]:
    if value is None:
        return {
            "value": None,
            "shown": "-",
            "met": None,
            "note": f"not measured in this run: {why_absent}",
        }
    met = value >= limit if higher_is_better else value <= limit
    return {"value": value, "shown": shown, "met": met, "note": "met" if met else "missed"}


def issue11_targets(result: dict[str, Any], summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Issue 11's targets from this run (and the mTLS results passed in with it), one row each:
    the value, met / missed, or why it was not measured."""
    rat = summary["ratios"].get("diktyo/haproxy", {})
    out: dict[str, dict[str, Any]] = {}
    for key, scen in (("sat_small", "sat-c50-small"), ("sat_1k", "sat-c50-1k")):
        r = (rat.get(scen) or {}).get("rps")
        v = r["median"] if r else None
        out[key] = _row(v, 0.8, True, f"{v:.2f}x" if v is not None else "",
                        f"needs diktyo and haproxy targets and the {scen} scenario")  # fmt: skip
    r = (rat.get("rate-1000") or {}).get("cpu_us_per_req")
    v = r["median"] if r else None
    out["cpu_1000"] = _row(v, 1.5, False, f"{v:.2f}x" if v is not None else "",
                           "needs diktyo and haproxy targets and the rate-1000 scenario")  # fmt: skip
    mem = summary["targets"].get("diktyo", {}).get("memory", {}).get("idle_rss_kib")
    v = mem["median"] * 1024 * 1024 / MB if mem else None
    out["idle_rss"] = _row(v, 30.0, False,
                           f"{v:.1f} MB ({mem['median']:.1f} MiB)" if mem else "",
                           "needs the diktyo target")  # fmt: skip
    conns = [
        c["downstream"]["bytes_per_conn"]
        for c in result.get("memory", {}).get("diktyo", {}).get("idle_conns", [])
        if "error" not in c
    ]
    v = statistics.median(conns) if conns else None
    out["rss_per_conn"] = _row(v, 4000.0, False, f"{v / 1000:.1f} KB" if v is not None else "",
                               "needs the diktyo target (bench/idleconns.py)")  # fmt: skip
    mtls = result.get("mtls") or {}
    src = f" (bench/mtls.py run of {mtls.get('date', '?')})" if mtls else ""
    m = (mtls.get("ratios") or {}).get("mtls/c50 vs plain/c50", {}).get("cpu_us_per_req")
    out["mtls_reuse"] = _row(m, 1.3, False, f"{m:.2f}x{src}" if m is not None else "",
                             "pass a bench/mtls.py result with --mtls-json FILE")  # fmt: skip
    ms = mtls.get("summary") or {}
    full, resumed = ms.get("mtls-noresume-noreuse/c1"), ms.get("mtls-noreuse/c1")
    base = ms.get("mtls/c1")
    v = None
    if full and resumed and base:
        cost_full = full["cpu_us_per_req"] - base["cpu_us_per_req"]
        cost_resumed = resumed["cpu_us_per_req"] - base["cpu_us_per_req"]
        v = cost_resumed / cost_full if cost_full > 0 else None
    out["mtls_resumption"] = _row(
        v,
        0.5,
        False,
        f"{v:.2f}x the full handshake's{src}" if v is not None else "",
        "needs a bench/mtls.py result with the cells mtls-noresume-noreuse/c1 (tickets off), "
        "mtls-noreuse/c1 and mtls/c1 (--mtls-json FILE)",
    )
    c2 = summary["ratios"].get(f"{CONCURRENCY_TARGET}/diktyo", {}).get("sat-c50-small", {})
    v = c2["rps"]["median"] if c2 and c2.get("rps") else None
    out["concurrency2"] = _row(v, 1.8, True, f"{v:.2f}x" if v is not None else "",
                               f"needs a {CONCURRENCY_TARGET} target (concurrency: 2)")  # fmt: skip
    return out


def _fmt(sp: dict[str, float] | None, digits: int = 0, spread: bool = True) -> str:
    if sp is None:
        return "-"
    f = f"{{:,.{digits}f}}"
    if not spread or sp["n"] < 2:
        return f.format(sp["median"])
    return f"{f.format(sp['median'])} ({f.format(sp['min'])}-{f.format(sp['max'])})"


def markdown(result: dict[str, Any], chart_name: str | None) -> str:
    s = result["summary"]
    mi = result["machine"]
    lines = [
        f"# diktyo benchmark, {result['mode']} run, {result['date']}",
        "",
        (
            f"{result['reps']} repetition(s) x {result['seconds']:g} s per scenario and target, targets interleaved "
            f"(order rotated per repetition), every proxy restarted per repetition. Medians, (min-max) when "
            f"more than one repetition. Proxies pinned to core {result['cores']['proxy']}; the upstream nginx "
            f"and the load generator share core {result['cores']['upstream_and_load']}."
        ),
        "",
        (
            f"Machine: {mi['cpu']}, {mi['cores']} cores, Linux {mi['kernel']}; load average "
            f"{' '.join(mi['loadavg_start'])} at start, {' '.join(mi.get('loadavg_end', []))} at end "
            f"(the machine is shared: compare within a run). Python {mi['python']}, uvloop {mi['uvloop']}, "
            f"httptools {mi['httptools']}, diktyo {mi['diktyo']} ({mi['diktyo_commit']}); {mi['nginx']}; "
            f"{mi['haproxy']}; {mi['wrk']}."
        ),
        "",
    ]
    for n in result["notes"]:
        lines.append(f"- NOTE: {n}")
    for t, why in result["failures"].items():
        lines.append(f"- FAILED: {t}: {why.splitlines()[0][:300]}")
    if result["notes"] or result["failures"]:
        lines.append("")

    lines += ["## Targets (issue)", "", "| target | value | verdict |", "|---|---|---|"]
    for k, desc in GOALS.items():
        g = s["goals"].get(k, {})
        v = g.get("value")
        lines.append(f"| {desc} | {'-' if v is None else f'{v:.2f}'} | {g.get('note', '-')} |")
    lines.append("")

    lines += [
        "## Issue 11 targets",
        "",
        "| figure | target | diktyo | verdict |",
        "|---|---|---|---|",
    ]
    for key, figure, target in ISSUE11:
        g = s.get("issue11", {}).get(key, {})
        lines.append(f"| {figure} | {target} | {g.get('shown', '-')} | {g.get('note', '-')} |")
    lines.append("")

    lines += [
        "## Figures",
        "",
        (
            "rps: requests per second; CPU: the proxy processes' utime+stime per request (both hops for "
            "mesh paths); util: proxy CPU / wall time (near 100 % = the proxy is the bottleneck); "
            "core 1: how busy the upstream + load generator core was (all processes on it); "
            "sys: the kernel's (syscalls') share of the proxy's CPU; "
            "latency in microseconds (saturation rows: wrk's closed-loop latency, not a latency figure; "
            "rate rows: paced open loop); added = minus direct's, same repetition."
        ),
        "",
        (
            "| scenario | target | rps | CPU us/req | sys | util | core 1 | p50 | p90 | p99 | p99.9 | added p50 | added p99 "
            "| errors |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    scen = list(result["scenarios"])
    for sc in scen:
        for t in result["targets"]:
            m = s["targets"].get(t, {}).get(sc)
            if not m:
                continue
            util = m["proxy_cpu_util"]
            util_s = "-" if util is None or t == "direct" else f"{util['median']:.0%}"
            sys_s = m["proxy_sys_share"]
            util_s = ("-" if sys_s is None else f"{sys_s['median']:.0%}") + " | " + util_s
            lc = m["load_core_busy"]
            util_s += " | -" if lc is None else f" | {lc['median']:.0%}"
            lines.append(
                f"| {sc} | {t} | {_fmt(m['rps'])} | {_fmt(m['cpu_us_per_req'], 1)} | "
                f"{util_s} | "
                + " | ".join(_fmt(m[p], 0, p == "p99") for p in PCTS)
                + f" | {_fmt(m['added_p50'], 0, False)} | {_fmt(m['added_p99'], 0)} | "
                f"{_fmt(m['error_count'], 0, False)} |"
            )
    lines.append("")

    paced = [sc for sc, v in result["scenarios"].items() if v["kind"] == "paced"]
    if paced:
        lines += [
            (
                "Paced rows without the coordinated-omission correction (latency from each request's "
                "actual send; a stall of the proxy then shows in the max only, and the achieved rate "
                "drops below the target):"
            ),
            "",
            "| scenario | target | achieved rps | p50 | p90 | p99 | p99.9 | max |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for sc in paced:
            for t in result["targets"]:
                rs = [r for r in result["runs"].get(t, {}).get(sc, []) if "uncorrected_us" in r]
                if not rs:
                    continue
                cells = [
                    _fmt(_spread([r["uncorrected_us"][k] for r in rs]), 0, k == "p99")
                    for k in ("p50", "p90", "p99", "p999", "max")
                ]
                rps = _fmt(_spread([r["rps"] for r in rs]))
                if any(r.get("truncated") for r in rs):
                    rps += " (truncated: could not keep up)"
                lines.append(f"| {sc} | {t} | {rps} | " + " | ".join(cells) + " |")
        lines.append("")

    lines += [
        "## Memory (MiB, whole process tree)",
        "",
        (
            "RSS per idle keep-alive connection (bytes, `bench/idleconns.py`): N client "
            "connections, one request each, then idle; *client only*: the requests one after "
            "another (one upstream connection); *with upstream*: all in flight at once, so the "
            "proxy also keeps up to N idle upstream connections in its pool."
        ),
        "",
        "| target | idle RSS | peak RSS (VmHWM) | per idle client conn | per client + upstream conn |",
        "|---|---|---|---|---|",
    ]
    for t in result["targets"]:
        mem = s["targets"][t]["memory"]
        lines.append(
            f"| {t} | {_fmt(mem['idle_rss_kib'], 1)} | {_fmt(mem['peak_rss_kib'], 1)} | "
            f"{_fmt(mem.get('idle_conn_bytes'))} | {_fmt(mem.get('idle_conn_with_upstream_bytes'))} |"
        )
    lines.append("")

    if result.get("sidecar_requests"):
        lines += [
            (
                "## Requests seen by the sidecars (istio_requests_total by reporter, code, flags; "
                "summed over repetitions)"
            ),
            "",
        ]
        for name, reps in result["sidecar_requests"].items():
            total: dict[str, int] = {}
            for counts in reps:
                for k, v in counts.items():
                    total[k] = total.get(k, 0) + v
            lines.append(
                f"- {name}: " + ", ".join(f"`{k}` {v:,}" for k, v in sorted(total.items()))
            )
        lines.append("")

    if s["ratios"]:
        lines += [
            "## Ratios, paired by repetition",
            "",
            "| pair | scenario | rps | CPU/req | rps per CPU-s | p99 | added p99 |",
            "|---|---|---|---|---|---|---|",
        ]
        for pair, per in s["ratios"].items():
            for sc, r in per.items():
                lines.append(
                    f"| {pair} | {sc} | "
                    + " | ".join(
                        _fmt(r[k], 2)
                        for k in ("rps", "cpu_us_per_req", "rps_per_cpu_s", "p99", "added_p99")
                    )
                    + " |"
                )
        lines.append("")

    lines += [
        "## Method",
        "",
        "- Upstream: nginx, 1 worker, `return 200` (3-byte body on `/`, 1 KiB on `/1k`), keep-alive.",
        (
            "- nginx proxy: 1 worker, `proxy_http_version 1.1`, upstream `keepalive 128`. HAProxy: `nbthread 1`, "
            "`http-reuse always`. diktyo: `diktyo sidecar --snapshot` with a per-upstream outbound listener "
            "(`default_host`), a 4-rule VirtualService (header, regex, prefix, method matches; the benchmark's "
            "requests fall through to the last, weighted 99/1 v1/v2 rule), a DestinationRule with subsets, "
            "LEAST_REQUEST, outlier detection; telemetry on. Mesh: client sidecar -> server sidecar's inbound "
            "listener -> upstream, plaintext (no mTLS), against HAProxy -> HAProxy -> upstream."
        ),
        "- Saturation: `wrk -t1 -cN --latency` with a Lua `done()` that prints percentiles.",
        (
            "- Fixed rates: `bench/pacer.c` (open loop, requests scheduled at t0 + i/rate; latency counted from the "
            "scheduled time when the connection was still busy, i.e. corrected for coordinated omission). "
            "1,000 rps on 1 connection; 5,000 rps on 5 connections. Debian 12 has no wrk2, vegeta or fortio, "
            "and hey rounds latencies to 0.1 ms."
        ),
        (
            "- CPU per request: utime+stime of the proxy processes from /proc/PID/stat before and after "
            "(10 ms ticks), divided by the requests completed."
        ),
    ]
    if chart_name:
        lines += ["", f"![latency percentiles at fixed rates]({chart_name})"]
    return "\n".join(lines) + "\n"


def chart(result: dict[str, Any], path: Path) -> Path | None:
    """Latency percentiles per target at each fixed rate; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    s = result["summary"]["targets"]
    rates = [sc for sc, v in result["scenarios"].items() if v["kind"] == "paced"]
    if not rates:
        return None
    fig, axes = plt.subplots(1, len(rates), figsize=(6 * len(rates), 4.5), squeeze=False)
    targets = result["targets"]
    width = 0.8 / max(1, len(targets))
    for ax, sc in zip(axes[0], rates):
        for i, t in enumerate(targets):
            m = s.get(t, {}).get(sc)
            if not m:
                continue
            vals = [m[p]["median"] if m[p] else 0 for p in PCTS]
            ax.bar([x + i * width for x in range(len(PCTS))], vals, width, label=t)
        ax.set_xticks([x + width * (len(targets) - 1) / 2 for x in range(len(PCTS))])
        ax.set_xticklabels(["p50", "p90", "p99", "p99.9"])
        ax.set_yscale("log")
        ax.set_ylabel("latency (us, log scale)")
        ax.set_title(f"{sc} rps ({result['mode']}, {result['date'][:16]})")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
