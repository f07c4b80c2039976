"""A small metric registry for the proxy's own counters and gauges (Envoy-style names).

Declare families once (``registry.counter(...)``), bind label values once
(``family.labels("outbound|9080|v1|reviews...")``) and keep the child: on the hot path a
child is a two-slot object whose ``inc()`` is one attribute add. Gauges whose value lives
elsewhere (active connections, ejected hosts) are read at scrape time through
``registry.gauge_func``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence

from diktyo.telemetry.exposition import escape_label_value, format_value, header

_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


class Child:
    """One series of a counter or gauge."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: float = 0

    def inc(self, amount: float = 1) -> None:
        self.value += amount

    def dec(self, amount: float = 1) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = value


class Family:
    """A counter or gauge family with fixed label names."""

    __slots__ = ("_children", "help", "kind", "labelnames", "name")

    def __init__(self, name: str, kind: str, help_text: str, labelnames: Sequence[str]) -> None:
        if not _NAME.match(name):
            raise ValueError(f"invalid metric name {name!r}: use [a-zA-Z_:][a-zA-Z0-9_:]*")
        for ln in labelnames:
            if not _LABEL.match(ln) or ln.startswith("__"):
                raise ValueError(
                    f"invalid label name {ln!r} for {name}: use [a-zA-Z_][a-zA-Z0-9_]*"
                )
        self.name = name
        self.kind = kind
        self.help = help_text
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], Child] = {}

    def labels(self, *values: str) -> Child:
        """The series for these label values (create once, keep the child)."""
        if len(values) != len(self.labelnames):
            raise ValueError(
                f"{self.name} takes labels {self.labelnames}, got {len(values)} values"
            )
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = Child()
        return child

    def inc(self, amount: float = 1) -> None:
        """For a family without labels."""
        self.labels().inc(amount)

    def set(self, value: float) -> None:
        self.labels().set(value)

    def remove(self, *values: str) -> None:
        self._children.pop(values, None)

    def value(self, *values: str) -> float:
        child = self._children.get(values)
        return child.value if child is not None else 0

    def samples(self) -> Iterable[tuple[tuple[str, ...], float]]:
        return ((k, c.value) for k, c in self._children.items())


class _FuncFamily:
    __slots__ = ("fn", "help", "kind", "labelnames", "name")

    def __init__(
        self,
        name: str,
        kind: str,
        help_text: str,
        labelnames: Sequence[str],
        fn: Callable[[], Iterable[tuple[Sequence[str], float]]],
    ) -> None:
        Family(name, kind, help_text, labelnames)  # validates names
        self.name, self.kind, self.help = name, kind, help_text
        self.labelnames = tuple(labelnames)
        self.fn = fn

    def samples(self) -> Iterable[tuple[Sequence[str], float]]:
        return self.fn()


class Registry:
    """Counters and gauges with HELP/TYPE, rendered in Prometheus text format."""

    def __init__(self) -> None:
        self._families: dict[str, Family | _FuncFamily] = {}

    def _add(self, fam: Family | _FuncFamily) -> None:
        if fam.name in self._families:
            raise ValueError(f"metric {fam.name} is declared twice; declare it once and share it")
        self._families[fam.name] = fam

    def counter(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> Family:
        fam = Family(name, "counter", help_text, labelnames)
        self._add(fam)
        return fam

    def gauge(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> Family:
        fam = Family(name, "gauge", help_text, labelnames)
        self._add(fam)
        return fam

    def gauge_func(
        self,
        name: str,
        help_text: str,
        labelnames: Sequence[str],
        fn: Callable[[], Iterable[tuple[Sequence[str], float]]],
    ) -> None:
        """A gauge read at scrape time: ``fn()`` yields (label values, value) pairs."""
        self._add(_FuncFamily(name, "gauge", help_text, labelnames, fn))

    def counter_func(
        self,
        name: str,
        help_text: str,
        labelnames: Sequence[str],
        fn: Callable[[], Iterable[tuple[Sequence[str], float]]],
    ) -> None:
        """A counter whose values live elsewhere (e.g. per-cluster stats objects)."""
        self._add(_FuncFamily(name, "counter", help_text, labelnames, fn))

    def get(self, name: str) -> Family | None:
        fam = self._families.get(name)
        return fam if isinstance(fam, Family) else None

    def collect(self, out: list[str]) -> None:
        for fam in self._families.values():
            samples = list(fam.samples())
            if not samples:
                continue
            header(out, fam.name, fam.kind, fam.help)
            for values, v in samples:
                if fam.labelnames:
                    lbl = ",".join(
                        f'{n}="{escape_label_value(x)}"'
                        for n, x in zip(fam.labelnames, values, strict=True)
                    )
                    out.append(f"{fam.name}{{{lbl}}} {format_value(v)}\n")
                else:
                    out.append(f"{fam.name} {format_value(v)}\n")


def proxy_registry() -> tuple[Registry, dict[str, Family]]:
    """The sidecar's own stats, declared up front with Envoy's names.

    Returns the registry and the families by short name: ``pending_overflow``,
    ``cx_overflow``, ``rq_retry``, ``rq_retry_overflow``, ``rq_timeout``, ``outlier_ejections``,
    ``rq_total`` (all per ``cluster_name``), ``config_pushes`` / ``config_rejects`` (no labels).
    """
    reg = Registry()
    c = "cluster_name"
    fams = {
        "pending_overflow": reg.counter(
            "envoy_cluster_upstream_rq_pending_overflow",
            "Requests that overflowed the connection pool or pending queue (circuit breaker, UO).",
            [c],
        ),
        "cx_overflow": reg.counter(
            "envoy_cluster_upstream_cx_overflow",
            "Connections refused because the cluster's connection limit was reached.",
            [c],
        ),
        "rq_retry": reg.counter("envoy_cluster_upstream_rq_retry", "Request retries.", [c]),
        "rq_retry_overflow": reg.counter(
            "envoy_cluster_upstream_rq_retry_overflow",
            "Retries not attempted because of circuit breaking or the retry budget.",
            [c],
        ),
        "rq_timeout": reg.counter(
            "envoy_cluster_upstream_rq_timeout",
            "Requests that timed out waiting for a response.",
            [c],
        ),
        "rq_total": reg.counter("envoy_cluster_upstream_rq_total", "Upstream requests.", [c]),
        "outlier_ejections": reg.counter(
            "envoy_cluster_outlier_detection_ejections_enforced_total",
            "Hosts ejected by outlier detection.",
            [c],
        ),
        "cx_active": reg.gauge(
            "envoy_cluster_upstream_cx_active", "Active upstream connections.", [c]
        ),
        "rq_active": reg.gauge(
            "envoy_cluster_upstream_rq_active", "Active upstream requests.", [c]
        ),
        "ejections_active": reg.gauge(
            "envoy_cluster_outlier_detection_ejections_active", "Hosts currently ejected.", [c]
        ),
        "config_pushes": reg.counter(
            "diktyo_proxy_config_applied_total", "Snapshots applied (ACK)."
        ),
        "config_rejects": reg.counter(
            "diktyo_proxy_config_rejected_total", "Snapshots rejected (NACK)."
        ),
    }
    return reg, fams
