"""Load results as fortio-like text or as JSON (pure)."""

from __future__ import annotations

import math
from typing import Any

from diktyo.load.runner import LoadResult
from diktyo.load.stats import ERROR_CODE


def _ms(seconds: float) -> str:
    return "nan" if math.isnan(seconds) else f"{seconds * 1000:.3f}"


def _p(p: float) -> str:
    return f"{p:g}"


def format_text(result: LoadResult) -> str:
    """The summary printed after a run: latency, percentiles, sockets, code histogram."""
    lat = result.latency
    lines = [
        f"Ended after {result.elapsed:.3f}s : {result.count} calls. qps={result.qps:.1f}",
        (
            f"Latency (ms) : count {lat.count} avg {_ms(lat.avg)} +/- {_ms(lat.stdev)} "
            f"min {_ms(lat.min)} max {_ms(lat.max)}"
        ),
    ]
    lines += [f"# target {_p(p)}% {_ms(v)} ms" for p, v in lat.percentiles]
    lines.append(
        f"Sockets used: {result.sockets} (for perfect keepalive, would be {result.connections})"
    )
    for code, n in result.codes.items():
        share = 100.0 * n / result.count if result.count else 0.0
        line = f"Code {code} : {n} ({share:.1f} %)"
        if code == ERROR_CODE and result.errors:
            line += " (" + ", ".join(f"{k}: {v}" for k, v in result.errors.items()) + ")"
        lines.append(line)
    lines.append(f"All done {result.count} calls {_ms(lat.avg)} ms avg, {result.qps:.1f} qps")
    return "\n".join(lines) + "\n"


def to_json(result: LoadResult) -> dict[str, Any]:
    """A JSON-ready dict; latencies in milliseconds, NaN as null."""
    lat = result.latency

    def ms(v: float) -> float | None:
        return None if math.isnan(v) else round(v * 1000, 6)

    return {
        "url": result.url,
        "proxy": result.proxy,
        "connections": result.connections,
        "requested_qps": result.requested_qps,
        "actual_qps": round(result.qps, 3),
        "elapsed_seconds": round(result.elapsed, 6),
        "count": result.count,
        "codes": {str(code): n for code, n in result.codes.items()},
        "errors": result.errors,
        "sockets": result.sockets,
        "latency_ms": {
            "min": ms(lat.min),
            "avg": ms(lat.avg),
            "stdev": ms(lat.stdev),
            "max": ms(lat.max),
            "percentiles": {_p(p): ms(v) for p, v in lat.percentiles},
        },
    }
