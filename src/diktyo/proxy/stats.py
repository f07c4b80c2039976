"""Sidecar counters: one mechanism for every stat, declared in ``diktyo.telemetry.stats``.

Istio's standard metrics go through ``record(peer, status, flags, duration_ms, req_bytes,
resp_bytes)`` with a ``peer`` key computed once per (reporter, cluster, host) by
:meth:`Stats.peer_for` (``IstioMetrics``: a dict lookup and a few list increments).

Envoy-named stats are *blocks* (``telemetry.stats.StatsList.block``): plain dicts with every
declared counter present at 0, one per scope:

- ``stats.server``: ``envoy_http_*``; callers do ``stats.server["downstream_rq_total"] += 1``.
- one block per cluster (``envoy_cluster_*{cluster_name=...}``): ``inc_cluster(cluster, key)``,
  or keep ``cluster_stats(cluster)`` and do ``block[key] += 1``.
- ``stats.proxy``: ``diktyo_proxy_*`` (``families["config_pushes"].inc()`` for the sidecar).

Gauges and the counters the upstream kernels keep themselves (``ClusterState``, the outlier
detector) are copied into the cluster blocks at scrape time; everything is formatted then.
"""

from __future__ import annotations

import logging
from typing import Any

from diktyo.telemetry.istio_metrics import IstioMetrics, PeerKey, PeerLabels, WorkloadInfo
from diktyo.telemetry.stats import (
    CLUSTER_STATS,
    LISTENER_STATS,
    PROXY_STATS,
    SERVER_STATS,
    collect,
    label_text,
)

log = logging.getLogger(__name__)

_GAUGES = tuple(s.key for s in CLUSTER_STATS.stats if s.kind == "gauge")
# ClusterState.counters keys exported as Envoy's cluster stats of the same name
_KERNEL_CLUSTER = tuple(
    k
    for k in (
        "upstream_cx_none_healthy",
        "lb_healthy_panic",
        "upstream_rq_total",
        "upstream_rq_5xx",
    )
    if k in CLUSTER_STATS
)
_OUTLIER = "outlier_detection_"


class Counter:
    """A handle on one unlabelled counter of a block (``inc``/``value``), for rare events."""

    __slots__ = ("block", "key")

    def __init__(self, block: dict[str, int], key: str) -> None:
        if key not in block:
            raise KeyError(f"stat {key!r} is not declared in diktyo.telemetry.stats")
        self.block = block
        self.key = key

    def inc(self, n: int = 1) -> None:
        self.block[self.key] += n

    def value(self) -> int:
        return self.block[self.key]


class Stats:
    """All counters of one sidecar process (survives snapshot swaps)."""

    def __init__(self) -> None:
        self.metrics = IstioMetrics()
        self.record = self.metrics.record
        self.server: dict[str, int] = SERVER_STATS.block()
        self.proxy: dict[str, int] = PROXY_STATS.block()
        # inbound mTLS handshakes (the CertificateStore's ``inbound_stats`` is this block)
        self.listener: dict[str, int] = LISTENER_STATS.block()
        self.families = {
            "config_pushes": Counter(self.proxy, "config_applied_total"),
            "config_rejects": Counter(self.proxy, "config_rejected_total"),
        }
        # cluster name -> (escaped label text, block)
        self._clusters: dict[str, dict[str, int]] = {}
        self._labels: dict[str, str] = {}
        self._peers: dict[tuple[Any, ...], PeerKey] = {}
        self._warned: set[str] = set()
        # with worker processes (diktyo.proxy.workers): adds the other workers' series
        self.merge: Any = None

    def record_request(
        self,
        reporter: str,
        peer: PeerKey,
        status: int,
        flags: str,
        duration_ms: float,
        req_bytes: int,
        resp_bytes: int,
    ) -> None:
        self.record(peer, status, flags, duration_ms, req_bytes, resp_bytes)

    def peer_for(
        self,
        reporter: str,
        me: WorkloadInfo,
        other: WorkloadInfo | None,
        service: str,
        protocol: str = "http",
    ) -> PeerKey:
        key = (reporter, me, other, service, protocol)
        p = self._peers.get(key)
        if p is None:
            if reporter == "source":
                labels = PeerLabels.build("source", me, other, service, protocol)
            else:
                labels = PeerLabels.build("destination", other, me, service, protocol)
            p = self._peers[key] = self.metrics.peer(labels)
        return p

    # ----------------------------------------------------------------- cluster stats

    def cluster_stats(self, cluster: str) -> dict[str, int]:
        """The block of ``cluster`` (made once, label text escaped once): keep it and do
        ``block["upstream_rq_retry"] += 1`` on a hot path."""
        b = self._clusters.get(cluster)
        if b is None:
            b = self._clusters[cluster] = CLUSTER_STATS.block()
            self._labels[cluster] = label_text(CLUSTER_STATS, (cluster,))
        return b

    def inc_cluster(self, cluster: str, name: str, n: int = 1) -> None:
        b = self._clusters.get(cluster)
        if b is None:
            b = self.cluster_stats(cluster)
        try:
            b[name] += n
        except KeyError:
            self._undeclared(b, name, n)

    def _undeclared(self, block: dict[str, int], name: str, n: int) -> None:
        block[name] = block.get(name, 0) + n
        if name not in self._warned:
            self._warned.add(name)
            log.warning(
                "stat %r is not declared in diktyo.telemetry.stats; it is exported with a "
                "placeholder HELP: declare it there",
                name,
            )

    def cluster_value(self, cluster: str, name: str) -> int:
        return self._clusters.get(cluster, {}).get(name, 0)

    @property
    def cluster(self) -> dict[str, dict[str, int]]:
        """Non-zero cluster counters by cluster name (a copy, for tests and the CLI)."""
        return {
            c: {k: v for k, v in b.items() if v and k not in _GAUGES}
            for c, b in self._clusters.items()
        }

    def request_count(self, **match: str) -> int:
        return self.metrics.request_count(**match)

    # ----------------------------------------------------------------- scrape time

    def _read_cluster_states(self, cluster_states: dict[str, Any]) -> None:
        """Gauges and kernel-owned counters into the blocks; clusters gone lose their gauges."""
        for b in self._clusters.values():
            for g in _GAUGES:
                b.pop(g, None)
        for name, cs in cluster_states.items():
            b = self.cluster_stats(name)
            br = getattr(cs, "breaker", None)
            if br is not None:
                b["upstream_cx_active"] = getattr(br, "connections", 0)
            b["upstream_rq_active"] = getattr(cs, "active_requests", 0)
            counters = getattr(cs, "counters", None)
            if counters:
                for k in _KERNEL_CLUSTER:
                    b[k] = counters.get(k, 0)
            od = getattr(cs, "outlier", None)
            if od is not None:
                for k, v in od.counters.items():
                    if _OUTLIER + k in CLUSTER_STATS:
                        b[_OUTLIER + k] = v
                b["outlier_detection_ejections_active"] = od.ejected_count(cs.hosts)

    def collect(self, out: list[str]) -> None:
        """Every family, Istio's first (``exposition.Collector``)."""
        self.metrics.collect(out)
        labels = self._labels
        collect(out, CLUSTER_STATS, ((labels[c], b) for c, b in sorted(self._clusters.items())))
        collect(out, LISTENER_STATS, [("", self.listener)])
        collect(out, PROXY_STATS, [("", self.proxy)])
        collect(out, SERVER_STATS, [("", self.server)])

    def render_prometheus(self, cluster_states: dict[str, Any] | None = None) -> str:
        """``/stats/prometheus``; ``cluster_states`` (name -> ``ClusterState``) feed the gauges
        and the counters the upstream kernels keep."""
        if cluster_states is not None:
            self._read_cluster_states(cluster_states)
        out: list[str] = []
        self.collect(out)
        text = "".join(out)
        return text if self.merge is None else str(self.merge(text))
