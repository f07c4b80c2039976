"""Clusters: one per service port, one per DestinationRule subset, with Istio's policy merge.

Traffic policy merge (as Istio's ``MergeTrafficPolicy``): the DestinationRule's top-level
``trafficPolicy``, then its ``portLevelSettings`` entry for the port, then the subset's
``trafficPolicy``, then the subset's ``portLevelSettings`` for the port. Each of
``loadBalancer``, ``connectionPool``, ``outlierDetection`` and ``tls`` is replaced whole by the
more specific level that sets it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from diktyo.control.model import ProxyNode, Service, WorkloadInstance
from diktyo.control.translate.hosts import (
    ConfigIndex,
    protocol_of,
    selector_matches,
    upstream_protocol,
)
from diktyo.security.spiffe import SpiffeId
from diktyo.snapshot.model import (
    Cluster,
    ConnectionPool,
    ConsistentHash,
    Endpoint,
    LoadBalancer,
    OutlierDetection,
    TlsSettings,
    cluster_name,
)


@dataclass
class _Policy:
    load_balancer: Any = None
    connection_pool: Any = None
    outlier_detection: Any = None
    tls: Any = None

    def apply(self, tp: Any, port: int) -> None:
        if tp is None:
            return
        self._take(tp)
        for pls in tp.port_level_settings:
            if pls.port is not None and pls.port.number == port:
                self._take(pls)
                break

    def _take(self, level: Any) -> None:
        for f in ("load_balancer", "connection_pool", "outlier_detection", "tls"):
            value = getattr(level, f, None)
            if value is not None:
                setattr(self, f, value)


def merged_policy(dr: Any, port: int, subset: str = "") -> _Policy:
    """The effective traffic policy of ``dr`` for ``port`` and ``subset``."""
    pol = _Policy()
    if dr is None:
        return pol
    pol.apply(dr.spec.traffic_policy, port)
    if subset:
        for s in dr.spec.subsets:
            if s.name == subset:
                pol.apply(s.traffic_policy, port)
                break
    return pol


def load_balancer(lb: Any) -> LoadBalancer:
    if lb is None:
        return LoadBalancer()
    simple = {
        None: "LEAST_REQUEST",
        "UNSPECIFIED": "LEAST_REQUEST",
        "LEAST_CONN": "LEAST_REQUEST",
    }.get(lb.simple, lb.simple)
    ch = None
    if lb.consistent_hash is not None:
        c = lb.consistent_hash
        ch = ConsistentHash(
            http_header_name=c.http_header_name,
            http_cookie=c.http_cookie.name if c.http_cookie else None,
            http_cookie_ttl=c.http_cookie.ttl if c.http_cookie else None,
            use_source_ip=bool(c.use_source_ip),
            http_query_parameter_name=c.http_query_parameter_name,
        )
    return LoadBalancer(simple=simple, consistent_hash=ch)


def _h2_upgrade(cp: Any) -> str | None:
    http = cp.http if cp is not None else None
    return http.h2_upgrade_policy if http is not None else None


def connection_pool(cp: Any) -> ConnectionPool:
    if cp is None:
        return ConnectionPool()
    kw: dict[str, Any] = {}
    tcp, http = cp.tcp, cp.http
    if tcp is not None:
        if tcp.max_connections is not None:
            kw["max_connections"] = tcp.max_connections
        if tcp.connect_timeout is not None:
            kw["connect_timeout"] = tcp.connect_timeout
        if tcp.idle_timeout is not None:
            kw["idle_timeout"] = tcp.idle_timeout
    if http is not None:
        for src, dst in (
            ("http1_max_pending_requests", "http1_max_pending_requests"),
            ("http2_max_requests", "http2_max_requests"),
            ("max_requests_per_connection", "max_requests_per_connection"),
            ("max_retries", "max_retries"),
            ("idle_timeout", "idle_timeout"),
            ("max_concurrent_streams", "max_concurrent_streams"),
        ):
            value = getattr(http, src)
            if value is not None:
                kw[dst] = value
    return ConnectionPool(**kw)


def outlier_detection(od: Any) -> OutlierDetection | None:
    """Istio's mapping: ``consecutive5xxErrors`` (0 disables), legacy ``consecutiveErrors`` counts
    gateway errors (502/503/504) only, as Istio has done since 1.5."""
    if od is None:
        return None
    c5xx: int | None = 5  # Envoy's default, enforced
    gateway: int | None = None
    if od.consecutive_errors is not None and od.consecutive_errors > 0:
        gateway, c5xx = od.consecutive_errors, None
    if od.consecutive_5xx_errors is not None:
        c5xx = od.consecutive_5xx_errors or None
    if od.consecutive_gateway_errors is not None:
        gateway = od.consecutive_gateway_errors or None
    kw: dict[str, Any] = {"consecutive_5xx_errors": c5xx, "consecutive_gateway_errors": gateway}
    if od.interval is not None:
        kw["interval"] = od.interval
    if od.base_ejection_time is not None:
        kw["base_ejection_time"] = od.base_ejection_time
    if od.max_ejection_percent:  # Istio: 0 keeps the default (10 %)
        kw["max_ejection_percent"] = float(od.max_ejection_percent)
    if od.min_health_percent is not None:
        kw["min_health_percent"] = float(od.min_health_percent)
    return OutlierDetection(**kw)


def tls_settings(tls: Any) -> TlsSettings | None:
    if tls is None:
        return None
    return TlsSettings(
        mode=tls.mode or "DISABLE",
        sni=tls.sni,
        ca_certificates=tls.ca_certificates,
        client_certificate=tls.client_certificate,
        private_key=tls.private_key,
        subject_alt_names=tuple(tls.subject_alt_names),
        insecure_skip_verify=bool(tls.insecure_skip_verify),
    )


def endpoints(
    svc: Service,
    port: int,
    instances: Iterable[WorkloadInstance],
    labels: dict[str, str],
    trust_domain: str,
) -> tuple[Endpoint, ...]:
    out: list[Endpoint] = []
    for inst in instances:
        if not inst.healthy or svc.hostname not in inst.services or port not in inst.ports:
            continue
        if not selector_matches(labels, inst.labels):
            continue
        principal = (
            SpiffeId(trust_domain, inst.namespace, inst.service_account).uri
            if inst.has_sidecar
            else ""
        )
        out.append(
            Endpoint(
                address=inst.address,
                port=inst.ports[port],
                labels=dict(inst.labels),
                weight=inst.weight,
                workload=inst.workload,
                namespace=inst.namespace,
                principal=principal,
                has_sidecar=inst.has_sidecar,
            )
        )
    return tuple(out)


def build_cluster(
    idx: ConfigIndex,
    proxy: ProxyNode,
    svc: Service | None,
    host: str,
    port: int,
    subset: str,
    trust_domain: str,
) -> Cluster:
    """The outbound cluster for (host, port, subset); empty when the service or subset is unknown."""
    dr = idx.destination_rule(host, proxy.node.namespace)
    subset_labels: dict[str, str] | None = {}
    if subset:
        subset_labels = None
        if dr is not None:
            for s in dr.spec.subsets:
                if s.name == subset:
                    subset_labels = dict(s.labels)
                    break
    pol = merged_policy(dr, port, subset)
    protocol = "http"
    eps: tuple[Endpoint, ...] = ()
    if svc is not None:
        for p in svc.ports:
            if p.number == port:
                protocol = protocol_of(p.name, p.protocol)
        if subset_labels is not None:
            eps = endpoints(svc, port, idx.instances_of(svc.hostname), subset_labels, trust_domain)
    # only set when not the default: snapshots omit defaults (msgspec compares by identity)
    up = upstream_protocol(protocol, _h2_upgrade(pol.connection_pool))
    extra: dict[str, Any] = {"upstream_protocol": up} if up == "HTTP/2" else {}
    return Cluster(
        **extra,
        name=cluster_name(port, subset, host),
        service=host,
        port=port,
        subset=subset,
        direction="outbound",
        endpoints=eps,
        lb=load_balancer(pol.load_balancer),
        pool=connection_pool(pol.connection_pool),
        outlier=outlier_detection(pol.outlier_detection),
        tls=tls_settings(pol.tls),
        protocol=protocol,  # type: ignore[arg-type]
        policy_source=f"DestinationRule {dr.name}" if dr is not None else "",
    )


def build_outbound_clusters(
    idx: ConfigIndex,
    proxy: ProxyNode,
    trust_domain: str,
    visible: Callable[[Service, int | None], bool] | None = None,
) -> dict[str, Cluster]:
    """Every (visible) registry service port, plus each subset of its DestinationRule."""
    out: dict[str, Cluster] = {}
    for svc in idx.registry.services:
        if "*" in svc.hostname or (visible is not None and not visible(svc, None)):
            continue
        dr = idx.destination_rule(svc.hostname, proxy.node.namespace)
        subsets = [""] + ([s.name for s in dr.spec.subsets] if dr is not None else [])
        for p in svc.ports:
            if visible is not None and not visible(svc, p.number):
                continue
            for subset in subsets:
                c = build_cluster(idx, proxy, svc, svc.hostname, p.number, subset, trust_domain)
                out.setdefault(c.name, c)
    return out
