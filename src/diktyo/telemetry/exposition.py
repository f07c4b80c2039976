"""Prometheus text exposition format 0.0.4: escaping, number formatting, HELP/TYPE headers.

Everything here runs at scrape time only; the hot path never formats text.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Protocol

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Collector(Protocol):
    """Anything that can append its metric families to an exposition."""

    def collect(self, out: list[str]) -> None: ...


def escape_label_value(value: str) -> str:
    """Escape a label value: backslash, double quote and line feed (the format's three escapes)."""
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return value


def escape_help(text: str) -> str:
    """Escape HELP text: backslash and line feed."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    """A sample value as Prometheus writes it: integers without a dot, +Inf/-Inf/NaN spelled out."""
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def format_bound(bound: float) -> str:
    """A histogram ``le`` bound (``0.5``, ``1``, ``3600000``)."""
    return format_value(float(bound))


def render_labels(names: Iterable[str], values: Iterable[str]) -> str:
    """``a="x",b="y"`` (without braces); values are escaped."""
    return ",".join(f'{n}="{escape_label_value(v)}"' for n, v in zip(names, values, strict=True))


def header(out: list[str], name: str, kind: str, help_text: str) -> None:
    out.append(f"# HELP {name} {escape_help(help_text)}\n")
    out.append(f"# TYPE {name} {kind}\n")


def histogram_lines(
    out: list[str],
    name: str,
    labels: str,
    bounds_text: tuple[str, ...],
    buckets: list[int] | list[float],
    offset: int,
    total: float,
    count: int,
) -> None:
    """Append ``_bucket`` (cumulative), ``_sum`` and ``_count`` lines for one series.

    ``buckets[offset : offset + len(bounds_text) + 1]`` are per-bucket (non-cumulative) counts,
    the last one being the overflow (+Inf) bucket.
    """
    sep = "," if labels else ""
    acc: float = 0
    for i, le in enumerate(bounds_text):
        acc += buckets[offset + i]
        out.append(f'{name}_bucket{{{labels}{sep}le="{le}"}} {int(acc)}\n')
    acc += buckets[offset + len(bounds_text)]
    out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {int(acc)}\n')
    if labels:
        out.append(f"{name}_sum{{{labels}}} {format_value(total)}\n")
        out.append(f"{name}_count{{{labels}}} {count}\n")
    else:
        out.append(f"{name}_sum {format_value(total)}\n")
        out.append(f"{name}_count {count}\n")


def render(*collectors: Collector) -> str:
    """The whole exposition for ``/stats/prometheus``: every collector's families, in order."""
    out: list[str] = []
    for c in collectors:
        c.collect(out)
    return "".join(out)
