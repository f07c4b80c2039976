"""InjectConfig: what the injector puts into a pod (image, control plane, ports, resources)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class InjectConfig:
    """Mesh-wide injection settings (Istio's injection template values).

    Per-pod annotations (``sidecar.istio.io/proxyImage``, ``proxyCPU``, ...,
    ``traffic.sidecar.istio.io/*``) override these for one pod.
    """

    image: str = "diktyo/diktyo:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    control_plane: str = "http://diktyo.diktyo-system.svc:15010"
    trust_domain: str = "cluster.local"
    log_level: str = "warning"
    tracing_sampling: float = 1.0  # percent of requests traced (Istio's meshConfig sampling)
    # sidecar worker processes (Istio's meshConfig.defaultConfig.concurrency; 0 = one per core;
    # None = the sidecar's default, 1); a pod's proxy.istio.io/config annotation wins
    concurrency: int | None = None
    revision: str = "default"
    proxy_uid: int = 1337  # traffic from this uid/gid is never captured (Istio's 1337)
    admin_port: int = 15000  # /ready, /stats/prometheus, /config_dump (on 127.0.0.1)
    status_port: int = 15020  # Istio's: /healthz/ready, /app-health/..., /stats/prometheus
    readiness_port: int = 15021  # Istio's: /healthz/ready (the sidecar's readinessProbe)
    rewrite_app_probes: bool = True  # sidecar.istio.io/rewriteAppHTTPProbers decides per pod
    outbound_capture_port: int = 15001
    inbound_capture_port: int = 15006
    cpu_request: str = "100m"
    memory_request: str = "128Mi"
    cpu_limit: str = "2000m"
    memory_limit: str = "1024Mi"
    # inbound ports never captured (the proxy's own); Istio: 15090,15021,15020
    exclude_inbound_ports: tuple[int, ...] = (15000, 15090, 15021, 15020)
    ignored_namespaces: tuple[str, ...] = field(default=("kube-system", "kube-public"))


DEFAULT_CONFIG = InjectConfig()
