"""The snapshot: everything a sidecar runs on, sent by the control plane as one versioned value.

Theory of operation
-------------------
The control plane translates Istio-style user config (``diktyo.api``) into a ``Snapshot`` per
proxy (``diktyo.control.translate``). The sidecar (``diktyo.proxy``) never sees an ``api``
type: it only knows these frozen structs. A snapshot is applied whole or rejected whole.

Naming follows Envoy: *listeners* accept connections, a *route table* of *virtual hosts* holds
ordered *routes*, a route points at weighted *clusters*, a cluster holds *endpoints* plus the
policies that apply to them (load balancer, connection pool / circuit breaker, outlier
detection, TLS). Cluster names follow Istio: ``outbound|9080|v1|reviews.default.svc.cluster.local``
and ``inbound|9080||``.

Durations are float seconds; ``None`` means "not set" (the proxy applies Istio's default).
Percentages are floats in [0, 100].

Wire format: JSON (``diktyo.snapshot.codec``), decoded with full type validation.
"""

from __future__ import annotations

from typing import Literal

from diktyo.snapshot.base import CanonicalStruct, SnapshotStruct
from diktyo.snapshot.security import SecurityConfig


class _S(SnapshotStruct, frozen=True):
    """Base for every snapshot struct: immutable, keyword-only, strict on decode."""


class _D(CanonicalStruct, frozen=True):
    """``_S`` for a struct with a default an equal value may not be identical to (a string,
    a float, a struct...): equal values still encode the same (``snapshot.base``)."""


# --------------------------------------------------------------------------- identity


class Node(_D, frozen=True):
    """The workload this sidecar sits beside (Istio's proxy metadata)."""

    id: str  # e.g. "reviews-v2-1.default"
    workload: str  # workload name, e.g. "reviews-v2"
    namespace: str = "default"
    labels: dict[str, str] = {}
    service_account: str = "default"
    trust_domain: str = "cluster.local"
    # services this workload implements (FQDNs), used for inbound telemetry labels
    services: tuple[str, ...] = ()
    mode: Literal["sidecar", "gateway", "standalone"] = "sidecar"
    # Istio's ISTIO_META_INTERCEPTION_MODE: REDIRECT = iptables sends the app's traffic to the
    # capture listeners (15001 / 15006, ``Snapshot.capture``); NONE = explicit proxy mode
    interception_mode: Literal["NONE", "REDIRECT"] = "NONE"


# --------------------------------------------------------------------------- matching


class StringMatch(_S, frozen=True):
    """Istio's StringMatch: exactly one of exact / prefix / regex; ``present`` for ``{}``."""

    kind: Literal["exact", "prefix", "regex", "present"]
    value: str = ""


class KeyMatch(_S, frozen=True):
    name: str  # header names lower-cased; query param names as given
    match: StringMatch


class RouteMatch(_S, frozen=True):
    """One HTTPMatchRequest. All set conditions must hold (AND)."""

    name: str = ""
    uri: StringMatch | None = None
    scheme: StringMatch | None = None
    method: StringMatch | None = None
    authority: StringMatch | None = None
    headers: tuple[KeyMatch, ...] = ()
    without_headers: tuple[KeyMatch, ...] = ()
    query_params: tuple[KeyMatch, ...] = ()
    ignore_uri_case: bool = False
    port: int | None = None
    source_labels: dict[str, str] = {}
    source_namespace: str | None = None
    gateways: tuple[str, ...] = ()


# --------------------------------------------------------------------------- route actions


class HeaderOps(_S, frozen=True):
    set: dict[str, str] = {}
    add: dict[str, str] = {}
    remove: tuple[str, ...] = ()


class Headers(_S, frozen=True):
    request: HeaderOps | None = None
    response: HeaderOps | None = None


class WeightedCluster(_S, frozen=True):
    cluster: str  # cluster name
    weight: int = 100
    host: str = ""  # destination host FQDN (telemetry, explain)
    subset: str = ""
    port: int | None = None
    headers: Headers | None = None


class Rewrite(_S, frozen=True):
    uri: str | None = None
    authority: str | None = None
    uri_regex: str | None = None  # uriRegexRewrite.match
    uri_regex_rewrite: str | None = None  # uriRegexRewrite.rewrite


class Redirect(_D, frozen=True):
    uri: str | None = None
    authority: str | None = None
    scheme: str | None = None
    port: int | None = None
    code: int = 301
    # replaces the matched uri prefix (like Envoy's prefix_rewrite; Gateway API ReplacePrefixMatch)
    prefix_rewrite: str | None = None


class DirectResponse(_S, frozen=True):
    status: int
    body: str = ""


class RetryPolicy(_D, frozen=True):
    attempts: int = 2
    per_try_timeout: float | None = None
    # Istio's default retryOn
    retry_on: tuple[str, ...] = ("connect-failure", "refused-stream", "unavailable", "cancelled")
    retriable_status_codes: tuple[int, ...] = ()
    retry_remote_localnet: bool = False


class FaultDelay(_D, frozen=True):
    fixed_delay: float
    percentage: float = 100.0


class FaultAbort(_D, frozen=True):
    http_status: int
    percentage: float = 100.0
    # fault.abort.grpcStatus: gRPC requests get this grpc-status (HTTP 200, trailers-only);
    # other requests get ``http_status`` (Envoy's mapping of the code)
    grpc_status: int | None = None


class Fault(_S, frozen=True):
    delay: FaultDelay | None = None
    abort: FaultAbort | None = None


class Mirror(_D, frozen=True):
    cluster: str
    host: str = ""
    subset: str = ""
    port: int | None = None
    percentage: float = 100.0


class RouteSource(_D, frozen=True):
    """Where this route came from, for ``diktyo explain`` and logs."""

    kind: str = "VirtualService"
    name: str = ""
    namespace: str = "default"
    rule: int = 0  # index in spec.http
    rule_name: str = ""
    file: str = ""
    line: int = 0
    # set when the rule came through a delegate VirtualService (Istio's ``delegate``): its
    # ``namespace/name``, the index in its spec.http and where that rule is written
    delegate: str = ""
    delegate_rule: int = 0
    delegate_file: str = ""
    delegate_line: int = 0


class Route(_D, frozen=True):
    """One HTTPRoute (Istio ``spec.http[i]``). ``matches`` empty means match-all; else OR."""

    name: str = ""
    matches: tuple[RouteMatch, ...] = ()
    clusters: tuple[WeightedCluster, ...] = ()
    redirect: Redirect | None = None
    direct_response: DirectResponse | None = None
    rewrite: Rewrite | None = None
    headers: Headers | None = None
    timeout: float | None = None  # None/0 = disabled (Istio default)
    retries: RetryPolicy | None = None  # None = Istio's default policy
    fault: Fault | None = None
    mirrors: tuple[Mirror, ...] = ()
    source: RouteSource = RouteSource()


class VirtualHost(_S, frozen=True):
    """All routes for one destination host, reachable under any of ``domains``.

    ``domains`` holds every spelling a client may use: ``reviews``, ``reviews:9080``,
    ``reviews.default``, ``reviews.default.svc.cluster.local[:9080]``; ``*`` is the
    catch-all; ``*.example.com`` a suffix wildcard.
    """

    name: str
    domains: tuple[str, ...]
    routes: tuple[Route, ...]


class RouteTable(_S, frozen=True):
    name: str
    virtual_hosts: tuple[VirtualHost, ...] = ()


# --------------------------------------------------------------------------- clusters


class ConsistentHash(_S, frozen=True):
    http_header_name: str | None = None
    http_cookie: str | None = None
    http_cookie_ttl: float | None = None
    use_source_ip: bool = False
    http_query_parameter_name: str | None = None


class LoadBalancer(_D, frozen=True):
    simple: Literal["ROUND_ROBIN", "LEAST_REQUEST", "RANDOM", "PASSTHROUGH"] = "LEAST_REQUEST"
    consistent_hash: ConsistentHash | None = None


class ConnectionPool(_D, frozen=True):
    """Circuit-breaker limits. Defaults are Envoy's/Istio's (effectively unlimited)."""

    max_connections: int = 2**32 - 1
    connect_timeout: float = 10.0
    http1_max_pending_requests: int = 2**32 - 1
    http2_max_requests: int = 2**32 - 1
    max_requests_per_connection: int = 0  # 0 = unlimited
    max_retries: int = 2**32 - 1
    idle_timeout: float = 3600.0  # Istio: 1h
    max_concurrent_streams: int = 0  # HTTP/2 streams per upstream connection; 0 = the peer's


class OutlierDetection(_D, frozen=True):
    consecutive_5xx_errors: int | None = 5
    consecutive_gateway_errors: int | None = None
    interval: float = 10.0
    base_ejection_time: float = 30.0
    max_ejection_percent: float = 10.0
    min_health_percent: float = 0.0


class TlsSettings(_D, frozen=True):
    mode: Literal["DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL"] = "DISABLE"
    sni: str | None = None
    ca_certificates: str | None = None  # PEM file path
    client_certificate: str | None = None
    private_key: str | None = None
    subject_alt_names: tuple[str, ...] = ()
    insecure_skip_verify: bool = False


class Endpoint(_D, frozen=True):
    address: str
    port: int
    labels: dict[str, str] = {}
    weight: int = 1
    workload: str = ""  # for telemetry: destination_workload
    namespace: str = "default"
    principal: str = ""  # SPIFFE id when the endpoint has a sidecar
    has_sidecar: bool = False


def cluster_name(port: int, subset: str, host: str) -> str:
    """An outbound cluster's name, as Istio writes it: ``outbound|<port>|<subset>|<host>``."""
    return f"outbound|{port}|{subset}|{host}"


class Cluster(_D, frozen=True):
    """A set of endpoints plus the traffic policy that applies to them."""

    name: str
    service: str = ""  # FQDN of the destination service
    port: int = 0
    subset: str = ""
    direction: Literal["outbound", "inbound"] = "outbound"
    endpoints: tuple[Endpoint, ...] = ()
    lb: LoadBalancer = LoadBalancer()
    pool: ConnectionPool = ConnectionPool()
    outlier: OutlierDetection | None = None
    tls: TlsSettings | None = None
    protocol: Literal["http", "http2", "grpc", "tcp"] = "http"
    # what the sidecar speaks to the endpoints: HTTP/2 for http2/grpc/grpc-web ports and for http
    # ports whose DestinationRule says h2UpgradePolicy: UPGRADE (Istio's rules)
    upstream_protocol: Literal["HTTP/1.1", "HTTP/2"] = "HTTP/1.1"
    # where the policy came from, for readable breaker messages
    policy_source: str = ""


# --------------------------------------------------------------------------- TCP routes, capture


class TcpRouteMatch(_S, frozen=True):
    """One VirtualService ``tcp[].match[]`` (L4MatchAttributes) left for the proxy to check;
    ``sourceLabels`` / ``sourceNamespace`` / ``gateways`` are decided when translating."""

    destination_subnets: tuple[str, ...] = ()  # IPs or CIDRs of the original destination
    port: int | None = None


class TcpRoute(_D, frozen=True):
    """One VirtualService ``tcp[]`` rule: first rule whose matches hold (OR; none = all) wins."""

    matches: tuple[TcpRouteMatch, ...] = ()
    clusters: tuple[WeightedCluster, ...] = ()
    source: RouteSource = RouteSource()


class CaptureService(_D, frozen=True):
    """What an outbound connection to ``address:port`` (a service VIP, or a CIDR of a
    ServiceEntry) is: Envoy's filter chain of the virtualOutbound listener for it."""

    address: str  # an IP or a CIDR
    port: int
    host: str  # FQDN of the service
    # "auto": Istio's protocol sniffing (unnamed port); else the declared protocol
    protocol: Literal["http", "http2", "grpc", "tcp", "auto"] = "auto"
    cluster: str = ""  # outbound|PORT||HOST, the TCP default when no tcp route matches
    tcp_routes: tuple[TcpRoute, ...] = ()


class CaptureInbound(_D, frozen=True):
    """One inbound port of this workload, keyed by the original destination (workload) port."""

    port: int  # the port the connection was sent to (container/target port)
    service_port: int = 0
    protocol: Literal["http", "http2", "grpc", "tcp", "auto"] = "auto"
    cluster: str = ""  # inbound|SERVICE_PORT||


class Capture(_D, frozen=True):
    """Transparent capture (iptables REDIRECT): what 15001 / 15006 do with a connection."""

    outbound_port: int = 15001
    inbound_port: int = 15006
    # meshConfig.outboundTrafficPolicy.mode (or the Sidecar resource's): destinations outside
    # the registry go to PassthroughCluster (ALLOW_ANY) or BlackHoleCluster (REGISTRY_ONLY)
    outbound_traffic_policy: Literal["ALLOW_ANY", "REGISTRY_ONLY"] = "ALLOW_ANY"
    # meshConfig.protocolDetectionTimeout: Istio's default since 1.8 is 0 = wait for the
    # client's first bytes without a timeout; after a timeout the connection is plain TCP
    protocol_detection_timeout: float = 0.0
    services: tuple[CaptureService, ...] = ()
    inbound: tuple[CaptureInbound, ...] = ()


# --------------------------------------------------------------------------- listeners


class Listener(_D, frozen=True):
    """A port the sidecar accepts connections on.

    - ``outbound``: HTTP proxy mode for the app (``HTTP_PROXY``); routes by Host with
      ``route_table``. If ``default_host`` is set (a per-upstream local port), requests are
      routed as if sent to that host.
    - ``inbound``: in front of the app; forwards to ``cluster`` (``inbound|PORT||``).
    - ``gateway``: an ingress gateway port, routes with ``route_table``.
    - ``tcp``: raw TCP passthrough to ``cluster`` (or by ``tcp_routes`` when set).
    - ``capture_outbound`` / ``capture_inbound``: Istio's virtualOutbound (15001) and
      virtualInbound (15006): connections redirected by iptables, demultiplexed by their
      original destination with ``Snapshot.capture`` (``diktyo.proxy.capture``).
    """

    name: str
    direction: Literal[
        "outbound", "inbound", "gateway", "tcp", "capture_outbound", "capture_inbound"
    ]
    address: str = "127.0.0.1"
    port: int = 0  # 0 = pick a free port
    route_table: str = ""
    cluster: str = ""
    default_host: str = ""
    service_port: int = 0  # the service port this listener stands for (inbound, telemetry)
    tcp_routes: tuple[TcpRoute, ...] = ()  # ``tcp`` listeners: VirtualService ``tcp:`` rules


# --------------------------------------------------------------------------- mesh-wide


class Tracing(_D, frozen=True):
    sampling: float = 1.0  # percent, Istio's default
    # http://host:port/v1/traces; a path (/telemetry/v1/traces) is on the control plane the
    # sidecar is connected to, at the address the sidecar reaches it by
    otlp_endpoint: str | None = None


class AccessLog(_D, frozen=True):
    enabled: bool = False
    format: Literal["text", "json"] = "text"
    path: str = "/dev/stdout"


class MeshConfig(_D, frozen=True):
    trust_domain: str = "cluster.local"
    tracing: Tracing = Tracing()
    access_log: AccessLog = AccessLog()
    # retry budget: max retries in flight as a percent of active requests (Envoy's default 20%)
    retry_budget_percent: float = 20.0
    retry_budget_min: int = 3
    # meshConfig.outboundTrafficPolicy.mode (a Sidecar resource may override it per workload)
    outbound_traffic_policy: Literal["ALLOW_ANY", "REGISTRY_ONLY"] = "ALLOW_ANY"
    # meshConfig.protocolDetectionTimeout in seconds; 0 = none (Istio's default since 1.8)
    protocol_detection_timeout: float = 0.0


# --------------------------------------------------------------------------- Telemetry API


class CustomTag(_S, frozen=True):
    """A span tag (Telemetry ``tracing[].customTags``): a literal, an env variable or a header."""

    name: str
    kind: Literal["literal", "environment", "header"]
    value: str = ""  # the literal, the variable name or the (lower-case) header name
    default: str = ""


class TracingPolicy(_D, frozen=True):
    sampling: float = 1.0  # percent
    span_reporting: bool = True  # False: propagate context, export no spans
    custom_tags: tuple[CustomTag, ...] = ()
    providers: tuple[str, ...] = ()


class AccessLogPolicy(_S, frozen=True):
    enabled: bool = False
    filter: str = ""  # CEL subset (diktyo.telemetry.cel); "" = every request
    providers: tuple[str, ...] = ()


class MetricOverride(_D, frozen=True):
    """One ``metrics[].overrides[]`` entry; applied in order, later entries win."""

    metric: str = "ALL_METRICS"  # REQUEST_COUNT, REQUEST_DURATION, ... (Istio's enum)
    mode: Literal["CLIENT_AND_SERVER", "CLIENT", "SERVER"] = "CLIENT_AND_SERVER"
    disabled: bool | None = None
    upsert: dict[str, str] = {}  # tag -> constant value
    remove: tuple[str, ...] = ()


class TelemetryPolicy(_D, frozen=True):
    """The Telemetry API resources that apply to this workload, merged (mesh < namespace <
    workload). ``client`` is outbound and gateway traffic (reporter=source), ``server`` is
    inbound (reporter=destination). Absent from the snapshot when no Telemetry applies; then
    ``mesh.tracing`` / ``mesh.access_log`` hold."""

    client_tracing: TracingPolicy = TracingPolicy()
    server_tracing: TracingPolicy = TracingPolicy()
    client_access_log: AccessLogPolicy = AccessLogPolicy()
    server_access_log: AccessLogPolicy = AccessLogPolicy()
    metrics: tuple[MetricOverride, ...] = ()
    sources: tuple[str, ...] = ()  # "namespace/name" of each applied Telemetry, widest first


class Snapshot(_D, frozen=True):
    version: str
    node: Node
    listeners: tuple[Listener, ...] = ()
    route_tables: tuple[RouteTable, ...] = ()
    clusters: tuple[Cluster, ...] = ()
    mesh: MeshConfig = MeshConfig()
    # peer authentication, authorization policies, JWT rules (diktyo.snapshot.security)
    security: SecurityConfig = SecurityConfig()
    # the Telemetry API for this workload (None: the mesh-wide defaults in ``mesh``)
    telemetry: TelemetryPolicy | None = None
    # transparent capture (Node.interception_mode REDIRECT): the 15001 / 15006 demultiplexing
    capture: Capture | None = None
