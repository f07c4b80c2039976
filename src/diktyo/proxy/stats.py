"""Sidecar counters: Istio's standard metrics (``diktyo.telemetry``) plus Envoy-named cluster stats.

The hot path calls ``record_request(reporter, peer, status, flags, duration_ms, req_bytes,
resp_bytes)`` with a ``peer`` key computed once per (reporter, cluster, host) by
``Stats.peer_for`` — a dict lookup and a few integer increments per request. Cluster counters
(``inc_cluster``) are plain dict increments; everything is formatted at scrape time.
"""

from __future__ import annotations

from typing import Any

from diktyo.telemetry.exposition import header
from diktyo.telemetry.istio_metrics import IstioMetrics, PeerKey, PeerLabels, WorkloadInfo
from diktyo.telemetry.registry import proxy_registry

# our counter name -> telemetry registry family short name
_FAMILIES = {
    "upstream_rq_pending_overflow": "pending_overflow",
    "upstream_cx_overflow": "cx_overflow",
    "upstream_rq_retry": "rq_retry",
    "upstream_rq_retry_overflow": "rq_retry_overflow",
    "upstream_rq_timeout": "rq_timeout",
}


class Stats:
    """All counters of one sidecar process (survives snapshot swaps)."""

    def __init__(self) -> None:
        self.metrics = IstioMetrics()
        self.registry, self.families = proxy_registry()
        self.record = self.metrics.record
        # cluster name -> counter -> value, for counters without a registry family
        self.cluster: dict[str, dict[str, int]] = {}
        self.server: dict[str, int] = {"downstream_cx_total": 0, "downstream_rq_total": 0}
        self._peers: dict[tuple[Any, ...], PeerKey] = {}

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

    def inc_cluster(self, cluster: str, name: str, n: int = 1) -> None:
        fam = _FAMILIES.get(name)
        if fam is not None:
            self.families[fam].labels(cluster).inc(n)
            return
        c = self.cluster.get(cluster)
        if c is None:
            c = self.cluster[cluster] = {}
        c[name] = c.get(name, 0) + n

    def cluster_value(self, cluster: str, name: str) -> int:
        fam = _FAMILIES.get(name)
        if fam is not None:
            return int(self.families[fam].value(cluster))
        return self.cluster.get(cluster, {}).get(name, 0)

    def request_count(self, **match: str) -> int:
        return self.metrics.request_count(**match)

    def render_prometheus(self, cluster_states: dict[str, Any] | None = None) -> str:
        out: list[str] = []
        self.metrics.collect(out)
        if cluster_states:
            fams = self.families
            for name, cs in cluster_states.items():
                br = getattr(cs, "breaker", None)
                if br is not None:
                    fams["cx_active"].labels(name).set(getattr(br, "connections", 0))
                fams["rq_active"].labels(name).set(getattr(cs, "active_requests", 0))
        self.registry.collect(out)
        by_metric: dict[str, list[str]] = {}
        for cname in sorted(self.cluster):
            for k, v in sorted(self.cluster[cname].items()):
                esc = cname.replace("\\", "\\\\").replace('"', '\\"')
                by_metric.setdefault(k, []).append(
                    f'envoy_cluster_{k}{{cluster_name="{esc}"}} {v}\n'
                )
        for k in sorted(by_metric):
            header(out, f"envoy_cluster_{k}", "counter", f"Envoy cluster stat {k}.")
            out.extend(by_metric[k])
        for k, v in sorted(self.server.items()):
            header(out, f"envoy_http_{k}", "counter", f"Envoy HTTP connection manager stat {k}.")
            out.append(f"envoy_http_{k} {v}\n")
        return "".join(out)
