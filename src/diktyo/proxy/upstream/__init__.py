"""Upstream side of the sidecar: clusters, hosts, load balancers, circuit breaker, outliers."""

from diktyo.proxy.upstream.circuit_breaker import CircuitBreaker
from diktyo.proxy.upstream.cluster import ClusterState
from diktyo.proxy.upstream.host import Host
from diktyo.proxy.upstream.lb import LbContext, make_load_balancer
from diktyo.proxy.upstream.outlier import OutlierDetector

__all__ = [
    "CircuitBreaker",
    "ClusterState",
    "Host",
    "LbContext",
    "OutlierDetector",
    "make_load_balancer",
]
