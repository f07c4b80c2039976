"""The benchmark report's arithmetic: medians and spread, ratios paired by repetition, added
latency against direct, and the issue's targets with "missed by how much" verdicts."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

# bench/ is a folder of scripts, not a package: load report.py under a private name
_spec = importlib.util.spec_from_file_location(
    "_diktyo_bench_report", Path(__file__).resolve().parents[2] / "bench" / "report.py"
)
assert _spec is not None and _spec.loader is not None
report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report)


def _run(rep: int, rps: float, cpu: float | None, p50: float, p99: float) -> dict[str, Any]:
    return {
        "rep": rep,
        "rps": rps,
        "requests": int(rps * 10),
        "seconds": 10.0,
        "cpu_us_per_req": cpu,
        "proxy_cpu_util": 1.0 if cpu else 0.0,
        "error_count": 0,
        "core_busy": {"0": 1.0, "1": 0.5},
        "latency_us": {"p50": p50, "p90": p50 * 2, "p99": p99, "p999": p99 * 2},
    }


def _result() -> dict[str, Any]:
    # two repetitions; diktyo is half HAProxy's rps in rep 0 and 40 % in rep 1
    runs = {
        "direct": {
            "sat-c50-small": [_run(0, 60000, None, 500, 900), _run(1, 60000, None, 500, 900)],
            "rate-1000": [_run(0, 1000, None, 20, 60), _run(1, 1000, None, 20, 60)],
        },
        "diktyo": {
            "sat-c50-small": [_run(0, 20000, 50, 2000, 4000), _run(1, 16000, 62.5, 2500, 5000)],
            "rate-1000": [_run(0, 1000, 120, 200, 400), _run(1, 1000, 80, 180, 300)],
        },
        "haproxy": {
            "sat-c50-small": [_run(0, 40000, 25, 1000, 2000), _run(1, 40000, 25, 1000, 2000)],
            "rate-1000": [_run(0, 1000, 40, 100, 200), _run(1, 1000, 40, 100, 200)],
        },
        "mesh-diktyo": {"rate-1000": [_run(0, 1000, 250, 400, 660), _run(1, 1000, 250, 400, 660)]},
        "mesh-haproxy": {"rate-1000": [_run(0, 1000, 80, 200, 260), _run(1, 1000, 80, 200, 260)]},
    }
    memory = {t: {"idle_rss_kib": [], "peak_rss_kib": []} for t in runs}
    memory["diktyo"] = {"idle_rss_kib": [30 * 1024, 50 * 1024], "peak_rss_kib": [60 * 1024] * 2}
    return {"runs": runs, "memory": memory}


def test_medians_spread_and_added_latency() -> None:
    s = report.summarise(_result())
    d = s["targets"]["diktyo"]["sat-c50-small"]
    assert d["rps"] == {"median": 18000, "min": 16000, "max": 20000, "n": 2}
    # added p99 = diktyo's p99 minus direct's in the same repetition
    assert d["added_p99"]["min"] == 3100 and d["added_p99"]["max"] == 4100
    assert s["targets"]["direct"]["sat-c50-small"]["added_p50"] is None
    assert s["targets"]["diktyo"]["memory"]["idle_rss_kib"]["median"] == 40.0


def test_ratios_are_paired_by_repetition() -> None:
    r = report.summarise(_result())["ratios"]["diktyo/haproxy"]["sat-c50-small"]
    assert r["rps"]["min"] == 0.4 and r["rps"]["max"] == 0.5
    # requests per CPU-second: 1e6/50 vs 1e6/25 -> 0.5; 1e6/62.5 vs 1e6/25 -> 0.4
    assert abs(r["rps_per_cpu_s"]["median"] - 0.45) < 1e-9


def test_goals_say_met_or_by_how_much() -> None:
    g = report.summarise(_result())["goals"]
    assert g["sat_rps_vs_haproxy"]["met"] is False
    assert "missed by 0.05x" in g["sat_rps_vs_haproxy"]["note"]
    assert g["cpu_at_1000"]["value"] == 100.0 and g["cpu_at_1000"]["met"] is True
    # mesh added p99: (660 - 60) / (260 - 60) = 3.0x two HAProxy hops, limit 1.5x
    assert g["mesh_added_p99"]["value"] == 3.0
    assert "2.00x the limit" in g["mesh_added_p99"]["note"]
    assert g["idle_rss"]["met"] is True


def test_markdown_has_every_section() -> None:
    result = _result()
    result.update(
        mode="quick",
        date="2026-01-01T00:00:00+00:00",
        reps=2,
        seconds=10.0,
        cores={"proxy": 0, "upstream_and_load": 1},
        notes=[],
        failures={},
        targets=list(result["runs"]),
        scenarios={"sat-c50-small": {"kind": "wrk"}, "rate-1000": {"kind": "paced"}},
        machine=dict.fromkeys(
            (
                "cpu",
                "cores",
                "kernel",
                "python",
                "uvloop",
                "httptools",
                "diktyo",
                "diktyo_commit",
                "nginx",
                "haproxy",
                "wrk",
            ),
            "x",
        )
        | {"loadavg_start": ["1", "1", "1"], "loadavg_end": ["1", "1", "1"]},
    )
    result["summary"] = report.summarise(result)
    md = report.markdown(result, "chart.png")
    for heading in ("## Targets (issue)", "## Figures", "## Memory", "## Ratios", "## Method"):
        assert heading in md
    assert "| sat-c50-small | diktyo | 18,000 (16,000-20,000) |" in md
    assert "![latency percentiles at fixed rates](chart.png)" in md
