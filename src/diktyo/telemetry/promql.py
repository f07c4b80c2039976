"""The one PromQL builder: selectors, rates, sums and quantiles over Istio's metric names.

Used by the dashboard's Prometheus source (``prometheus_source``) and by the Grafana
dashboards (``grafana``), so both ask Prometheus the same questions in the same words.
Label values are escaped as PromQL string literals here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from diktyo.telemetry.stats import ISTIO_NAMES

REQUESTS = ISTIO_NAMES["REQUEST_COUNT"]
DURATION = ISTIO_NAMES["REQUEST_DURATION"]
RESPONSE_BYTES = ISTIO_NAMES["RESPONSE_SIZE"]
TCP_SENT = ISTIO_NAMES["TCP_SENT_BYTES"]
TCP_RECEIVED = ISTIO_NAMES["TCP_RECEIVED_BYTES"]

Matcher = tuple[str, str, str]  # (label, "=" | "!=" | "=~" | "!~", value)
_OPS = ("=", "!=", "=~", "!~")
NOT_5XX: Matcher = ("response_code", "!~", "5..")


def string(value: str) -> str:
    """A PromQL double-quoted string literal for ``value``."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def selector(match: Mapping[str, str] | Iterable[Matcher] = ()) -> str:
    """``{k="v",...}``: equality from a mapping (sorted by label), or matchers in order;
    ``""`` for none."""
    if isinstance(match, Mapping):
        matchers: list[Matcher] = [(k, "=", v) for k, v in sorted(match.items())]
    else:
        matchers = list(match)
    if not matchers:
        return ""
    for _, op, _ in matchers:
        if op not in _OPS:
            raise ValueError(f"PromQL matcher operator {op!r}: use one of {', '.join(_OPS)}")
    return "{" + ",".join(f"{k}{op}{string(v)}" for k, op, v in matchers) + "}"


def rate(metric: str, sel: str, window: str, fn: str = "rate") -> str:
    """``rate(metric{sel}[window])`` (``fn="increase"`` for increase)."""
    return f"{fn}({metric}{sel}[{window}])"


def sum_by(expr: str, by: Sequence[str] = ()) -> str:
    """``sum by (a, b) (expr)``, or ``sum(expr)`` without grouping labels."""
    if not by:
        return f"sum({expr})"
    return f"sum by ({', '.join(by)}) ({expr})"


def quantile(q: float, metric: str, sel: str, window: str, by: Sequence[str] = ()) -> str:
    """``histogram_quantile(q, sum by (by, le) (rate(metric_bucket{sel}[window])))``."""
    return (
        f"histogram_quantile({q:g}, {sum_by(rate(metric + '_bucket', sel, window), (*by, 'le'))})"
    )


def success_ratio(matchers: Sequence[Matcher], window: str, by: Sequence[str] = ()) -> str:
    """Share of requests answered without a 5xx."""
    ok = sum_by(rate(REQUESTS, selector([*matchers, NOT_5XX]), window), by)
    return f"{ok} / {sum_by(rate(REQUESTS, selector(matchers), window), by)}"
