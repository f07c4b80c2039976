"""Istio's networking.istio.io schemas: VirtualService, DestinationRule, ServiceEntry, Gateway, Sidecar.

Field names, types and enums follow Istio's CRDs (``customresourcedefinitions.gen.yaml``);
Python attributes are snake_case, YAML keys are Istio's camelCase.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, ValidationInfo, field_validator, model_validator
from pydantic.alias_generators import to_camel

from diktyo.api.base import (
    HttpCode,
    Int32,
    IstioModel,
    LabelSelector,
    NonNegInt,
    Percent,
    PortSelector,
    PosInt,
    StringMatch,
    UInt32,
    WorkloadSelector,
    check_regex,
)
from diktyo.api.duration import Duration

# --------------------------------------------------------------------------- hosts

_DNS_LABEL = re.compile(r"^[a-zA-Z0-9](?:[-a-zA-Z0-9]*[a-zA-Z0-9])?$")


def _check_host(value: str) -> str:
    """Istio's wildcard-domain rule: ASCII DNS labels (RFC 1123), '*' only as the first label.

    A Unicode host (``revіews`` with a Cyrillic 'і') can never match a request's Host header,
    which is ASCII (IDNA ``xn--`` form); Istio's webhook refuses it.
    """
    if len(value) > 255:
        raise ValueError(f"host {value[:40]!r}... is longer than 255 characters")
    rest = value
    if rest == "*":
        return value
    if rest.startswith("*."):
        rest = rest[2:]
    elif rest.startswith("*"):
        rest = rest[1:]
    for label in rest.split("."):
        if len(label) > 63 or not _DNS_LABEL.match(label):
            if not label.isascii():
                why = "has non-ASCII characters; write internationalised names in their xn-- form"
            else:
                why = "must be letters, digits and '-', starting and ending with a letter or digit"
            raise ValueError(f"invalid host {value!r}: label {label!r} {why}")
    return value


Host = Annotated[str, AfterValidator(_check_host)]

# --------------------------------------------------------------------------- VirtualService


class Destination(IstioModel):
    host: Host
    subset: str | None = None
    port: PortSelector | None = None


class HeaderOperations(IstioModel):
    set: dict[str, str] = Field(default_factory=dict)
    add: dict[str, str] = Field(default_factory=dict)
    remove: list[str] = Field(default_factory=list)


class Headers(IstioModel):
    request: HeaderOperations | None = None
    response: HeaderOperations | None = None


class HTTPMatchRequest(IstioModel):
    name: str | None = None
    uri: StringMatch | None = None
    scheme: StringMatch | None = None
    method: StringMatch | None = None
    authority: StringMatch | None = None
    headers: dict[str, StringMatch] = Field(default_factory=dict)
    port: UInt32 | None = None
    source_labels: dict[str, str] = Field(default_factory=dict)
    gateways: list[str] = Field(default_factory=list)
    query_params: dict[str, StringMatch] = Field(default_factory=dict)
    ignore_uri_case: bool = False
    without_headers: dict[str, StringMatch] = Field(default_factory=dict)
    source_namespace: str | None = None
    stat_prefix: str | None = None


class HTTPRouteDestination(IstioModel):
    destination: Destination
    weight: Int32 | None = None
    headers: Headers | None = None


class RouteDestination(IstioModel):
    destination: Destination
    weight: Int32 | None = None


class HTTPRedirect(IstioModel):
    uri: str | None = None
    authority: str | None = None
    port: UInt32 | None = None
    derive_port: Literal["FROM_PROTOCOL_DEFAULT", "FROM_REQUEST_PORT"] | None = None
    scheme: str | None = None
    redirect_code: UInt32 | None = None
    prefix_rewrite: str | None = None


class HTTPBody(IstioModel):
    string: str | None = None
    bytes: str | None = None  # base64


class HTTPDirectResponse(IstioModel):
    status: UInt32
    body: HTTPBody | None = None


class RegexRewrite(IstioModel):
    match: str | None = None
    rewrite: str | None = None

    @field_validator("match")
    @classmethod
    def _match(cls, v: str | None) -> str | None:
        return None if v is None else check_regex(v)


class HTTPRewrite(IstioModel):
    uri: str | None = None
    authority: str | None = None
    uri_regex_rewrite: RegexRewrite | None = None


class HTTPRetry(IstioModel):
    attempts: Int32 | None = None
    per_try_timeout: Duration | None = None
    retry_on: str | None = None
    retry_remote_localities: bool | None = None
    retry_ignore_previous_hosts: bool | None = None
    backoff: Duration | None = None


class FaultDelay(IstioModel):
    fixed_delay: Duration | None = None
    exponential_delay: Duration | None = None
    percentage: Percent | None = None
    percent: Int32 | None = None  # legacy integer percent


class FaultAbort(IstioModel):
    http_status: Int32 | None = None
    grpc_status: str | None = None
    http2_error: str | None = None
    percentage: Percent | None = None
    percent: Int32 | None = None  # legacy integer percent (Istio's own samples still use it)


class HTTPFaultInjection(IstioModel):
    delay: FaultDelay | None = None
    abort: FaultAbort | None = None


class HTTPMirrorPolicy(IstioModel):
    destination: Destination
    percentage: Percent | None = None


class CorsPolicy(IstioModel):
    allow_origins: list[StringMatch] = Field(default_factory=list)
    allow_origin: list[str] = Field(default_factory=list)
    allow_methods: list[str] = Field(default_factory=list)
    allow_headers: list[str] = Field(default_factory=list)
    expose_headers: list[str] = Field(default_factory=list)
    max_age: Duration | None = None
    allow_credentials: bool | None = None
    unmatched_preflights: Literal["UNSPECIFIED", "FORWARD", "IGNORE"] | None = None


class Delegate(IstioModel):
    name: str | None = None
    namespace: str | None = None


class HTTPRoute(IstioModel):
    name: str | None = None
    match: list[HTTPMatchRequest] = Field(default_factory=list)
    route: list[HTTPRouteDestination] = Field(default_factory=list)
    redirect: HTTPRedirect | None = None
    direct_response: HTTPDirectResponse | None = None
    delegate: Delegate | None = None
    rewrite: HTTPRewrite | None = None
    timeout: Duration | None = None
    retries: HTTPRetry | None = None
    fault: HTTPFaultInjection | None = None
    mirror: Destination | None = None
    mirrors: list[HTTPMirrorPolicy] = Field(default_factory=list)
    mirror_percent: UInt32 | None = None
    mirror_percent_legacy: UInt32 | None = Field(default=None, alias="mirror_percent")
    mirror_percentage: Percent | None = None
    cors_policy: CorsPolicy | None = None
    headers: Headers | None = None

    @model_validator(mode="after")
    def _actions(self) -> HTTPRoute:
        if self.redirect is not None and self.direct_response is not None:
            raise ValueError("redirect and directResponse cannot both be set")
        if self.delegate is not None:
            # Istio's validation of a root route: only the delegate says where requests go
            name = f" {self.name}" if self.name else ""
            if self.route:
                raise ValueError(
                    f"root HTTP route{name} must not specify route (it has a delegate)"
                )
            if self.redirect is not None:
                raise ValueError(
                    f"root HTTP route{name} must not specify redirect (it has a delegate)"
                )
        return self


class L4MatchAttributes(IstioModel):
    destination_subnets: list[str] = Field(default_factory=list)
    port: UInt32 | None = None
    source_subnet: str | None = None
    source_labels: dict[str, str] = Field(default_factory=dict)
    gateways: list[str] = Field(default_factory=list)
    source_namespace: str | None = None


class TLSMatchAttributes(IstioModel):
    sni_hosts: list[str]
    destination_subnets: list[str] = Field(default_factory=list)
    port: UInt32 | None = None
    source_labels: dict[str, str] = Field(default_factory=dict)
    gateways: list[str] = Field(default_factory=list)
    source_namespace: str | None = None


class TCPRoute(IstioModel):
    match: list[L4MatchAttributes] = Field(default_factory=list)
    route: list[RouteDestination] = Field(default_factory=list)


class TLSRoute(IstioModel):
    match: list[TLSMatchAttributes]
    route: list[RouteDestination] = Field(default_factory=list)


class VirtualService(IstioModel):
    """A VirtualService; one without ``hosts`` is a *delegate*, used only through the
    ``delegate`` of another VirtualService's HTTP route (Istio's rules, one level deep)."""

    hosts: list[Host] = Field(default_factory=list)
    gateways: list[str] = Field(default_factory=list)
    http: list[HTTPRoute] = Field(default_factory=list)
    tls: list[TLSRoute] = Field(default_factory=list)
    tcp: list[TCPRoute] = Field(default_factory=list)
    export_to: list[str] = Field(default_factory=list)

    @field_validator("gateways")
    @classmethod
    def _delegate_gateways(cls, v: list[str], info: ValidationInfo) -> list[str]:
        if v and not info.data.get("hosts"):
            raise ValueError(
                "delegate virtual service must have no gateways specified (a VirtualService "
                "without hosts is a delegate; the root VirtualService binds the gateways)"
            )
        return v

    @field_validator("http")
    @classmethod
    def _delegate_routes(cls, v: list[HTTPRoute], info: ValidationInfo) -> list[HTTPRoute]:
        if "hosts" in info.data and not info.data["hosts"]:
            for i, rule in enumerate(v):
                if rule.delegate is not None:
                    raise ValueError(
                        f"http[{i}]: delegate HTTP route cannot contain delegate (a "
                        "VirtualService without hosts is a delegate; only one level of "
                        "delegation is supported)"
                    )
                if not rule.route and rule.redirect is None and rule.direct_response is None:
                    raise ValueError(f"http[{i}]: HTTP route or redirect is required")
        return v

    @field_validator("tls", "tcp")
    @classmethod
    def _delegate_l4(cls, v: list[object], info: ValidationInfo) -> list[object]:
        if v and "hosts" in info.data and not info.data["hosts"]:
            raise ValueError(
                f"delegate virtual service must have no {info.field_name} route specified "
                "(only HTTP routes can be delegated)"
            )
        return v


# --------------------------------------------------------------------------- DestinationRule


class TcpKeepalive(IstioModel):
    probes: UInt32 | None = None
    time: Duration | None = None
    interval: Duration | None = None


class TCPSettings(IstioModel):
    max_connections: Int32 | None = None
    connect_timeout: Duration | None = None
    tcp_keepalive: TcpKeepalive | None = None
    max_connection_duration: Duration | None = None
    idle_timeout: Duration | None = None


class HTTP2KeepAlive(IstioModel):
    interval: Duration | None = None
    timeout: Duration | None = None


class HTTPSettings(IstioModel):
    http1_max_pending_requests: Int32 | None = None
    http2_max_requests: Int32 | None = None
    max_requests_per_connection: Int32 | None = None
    max_retries: Int32 | None = None
    idle_timeout: Duration | None = None
    h2_upgrade_policy: Literal["DEFAULT", "DO_NOT_UPGRADE", "UPGRADE"] | None = None
    use_client_protocol: bool | None = None
    max_concurrent_streams: Int32 | None = None
    http2_keep_alive: HTTP2KeepAlive | None = None


class ConnectionPoolSettings(IstioModel):
    tcp: TCPSettings | None = None
    http: HTTPSettings | None = None


class HTTPCookieAttribute(IstioModel):
    name: str
    value: str | None = None


class HTTPCookie(IstioModel):
    name: str
    path: str | None = None
    ttl: Duration | None = None
    attributes: list[HTTPCookieAttribute] = Field(default_factory=list)


class RingHash(IstioModel):
    minimum_ring_size: NonNegInt | None = None


class MagLev(IstioModel):
    table_size: NonNegInt | None = None


class ConsistentHashLB(IstioModel):
    http_header_name: str | None = None
    http_cookie: HTTPCookie | None = None
    use_source_ip: bool | None = None
    http_query_parameter_name: str | None = None
    ring_hash: RingHash | None = None
    maglev: MagLev | None = None
    minimum_ring_size: NonNegInt | None = None


class LocalityDistribute(IstioModel):
    from_: str | None = Field(default=None, alias="from")
    to: dict[str, UInt32] = Field(default_factory=dict)


class LocalityFailover(IstioModel):
    from_: str | None = Field(default=None, alias="from")
    to: str | None = None


class LocalityLoadBalancerSetting(IstioModel):
    distribute: list[LocalityDistribute] = Field(default_factory=list)
    failover: list[LocalityFailover] = Field(default_factory=list)
    failover_priority: list[str] = Field(default_factory=list)
    enabled: bool | None = None


class ZoneAwareLbSetting(IstioModel):
    enabled: bool | None = None
    failover: list[LocalityFailover] = Field(default_factory=list)
    failover_priority: list[str] = Field(default_factory=list)
    min_cluster_size: PosInt | None = None


class WarmupConfiguration(IstioModel):
    duration: Duration
    minimum_percent: float | None = None
    aggression: float | None = None


class LoadBalancerSettings(IstioModel):
    simple: (
        Literal[
            "UNSPECIFIED", "LEAST_CONN", "RANDOM", "PASSTHROUGH", "ROUND_ROBIN", "LEAST_REQUEST"
        ]
        | None
    ) = None
    consistent_hash: ConsistentHashLB | None = None
    locality_lb_setting: LocalityLoadBalancerSetting | None = None
    warmup_duration_secs: Duration | None = None
    warmup: WarmupConfiguration | None = None
    zone_aware_lb_setting: ZoneAwareLbSetting | None = None

    @model_validator(mode="after")
    def _one_of(self) -> LoadBalancerSettings:
        if self.simple is not None and self.consistent_hash is not None:
            raise ValueError("only one of simple, consistentHash may be set")
        return self


class OutlierDetection(IstioModel):
    split_external_local_origin_errors: bool | None = None
    consecutive_local_origin_failures: UInt32 | None = None
    consecutive_gateway_errors: UInt32 | None = None
    consecutive_5xx_errors: UInt32 | None = Field(default=None, alias="consecutive5xxErrors")
    interval: Duration | None = None
    base_ejection_time: Duration | None = None
    max_ejection_percent: Int32 | None = None
    min_health_percent: Int32 | None = None
    consecutive_errors: Int32 | None = None  # deprecated, = consecutive5xxErrors
    outlier_detection_http_error_codes: list[HttpCode] = Field(default_factory=list)


class ClientTLSSettings(IstioModel):
    mode: Literal["DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL"] | None = None
    client_certificate: str | None = None
    private_key: str | None = None
    ca_certificates: str | None = None
    credential_name: str | None = None
    subject_alt_names: list[str] = Field(default_factory=list)
    sni: str | None = None
    insecure_skip_verify: bool | None = None
    ca_crl: str | None = None


class PortTrafficPolicy(IstioModel):
    port: PortSelector | None = None
    load_balancer: LoadBalancerSettings | None = None
    connection_pool: ConnectionPoolSettings | None = None
    outlier_detection: OutlierDetection | None = None
    tls: ClientTLSSettings | None = None


class TunnelSettings(IstioModel):
    protocol: str | None = None
    target_host: str
    target_port: UInt32


class ProxyProtocol(IstioModel):
    version: Literal["V1", "V2"] | None = None


class RetryBudget(IstioModel):
    percent: float | None = None
    min_retry_concurrency: UInt32 | None = None
    budget_interval: Duration | None = None


class TrafficPolicy(IstioModel):
    load_balancer: LoadBalancerSettings | None = None
    connection_pool: ConnectionPoolSettings | None = None
    outlier_detection: OutlierDetection | None = None
    tls: ClientTLSSettings | None = None
    port_level_settings: list[PortTrafficPolicy] = Field(default_factory=list)
    tunnel: TunnelSettings | None = None
    proxy_protocol: ProxyProtocol | None = None
    retry_budget: RetryBudget | None = None


class Subset(IstioModel):
    name: str
    labels: dict[str, str] = Field(default_factory=dict)
    traffic_policy: TrafficPolicy | None = None


class DestinationRule(IstioModel):
    host: str
    traffic_policy: TrafficPolicy | None = None
    subsets: list[Subset] = Field(default_factory=list)
    export_to: list[str] = Field(default_factory=list)
    workload_selector: LabelSelector | None = None


# --------------------------------------------------------------------------- ServiceEntry


_PORT_NAME = re.compile(r"^[a-zA-Z0-9](?:[-a-zA-Z0-9]*[a-zA-Z0-9])?$")


def _check_port(value: int | None) -> None:
    if value is not None and not 0 < value <= 65535:
        raise ValueError(f"port {value} must be between 1-65535")


class ServicePort(IstioModel):
    number: UInt32
    protocol: str | None = None
    name: str
    target_port: UInt32 | None = None

    @model_validator(mode="after")
    def _ports(self) -> ServicePort:
        _check_port(self.number)
        _check_port(self.target_port)
        return self


class WorkloadEntry(IstioModel):
    address: str | None = None
    ports: dict[str, UInt32] = Field(default_factory=dict)
    labels: dict[str, str] = Field(default_factory=dict)
    network: str | None = None
    locality: str | None = None
    weight: UInt32 | None = None
    service_account: str | None = None

    @model_validator(mode="after")
    def _rules(self) -> WorkloadEntry:
        # the CEL rules of Istio's CRD
        if self.address is None and self.network is None:
            raise ValueError("Address is required")
        for name, port in self.ports.items():
            if len(name) >= 63 or not _PORT_NAME.match(name):
                raise ValueError(f"port name {name!r} must be valid (letters, digits, '-')")
            _check_port(port)
        address = self.address or ""
        if address.startswith("unix://"):
            if address[len("unix://") :][:1] not in ("/", "@"):
                raise ValueError("UDS must be an absolute path or abstract socket")
            if address.endswith("/"):
                raise ValueError("UDS may not be a dir")
            if self.ports:
                raise ValueError("UDS may not include ports")
        return self


class ServiceEntry(IstioModel):
    hosts: list[str]
    addresses: list[str] = Field(default_factory=list)
    ports: list[ServicePort] = Field(default_factory=list)
    location: Literal["MESH_EXTERNAL", "MESH_INTERNAL"] | None = None
    resolution: Literal["NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN", "DYNAMIC_DNS"] | None = None
    endpoints: list[WorkloadEntry] = Field(default_factory=list)
    workload_selector: WorkloadSelector | None = None
    export_to: list[str] = Field(default_factory=list)
    subject_alt_names: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _rules(self) -> ServiceEntry:
        # the CEL rules of Istio's CRD, with its messages
        fields = self.model_fields_set
        resolution = self.resolution or "NONE"
        if not self.hosts:
            raise ValueError("hosts must list at least one host")
        if "*" in self.hosts:
            raise ValueError("hostname cannot be wildcard")
        if "workload_selector" in fields and "endpoints" in fields:
            raise ValueError("only one of WorkloadSelector or Endpoints can be set")
        if any("/" in a for a in self.addresses) and resolution not in ("STATIC", "NONE"):
            raise ValueError("CIDR addresses are allowed only for NONE/STATIC resolution types")
        if resolution == "NONE" and "endpoints" in fields:
            raise ValueError("NONE mode cannot set endpoints (set 'resolution: STATIC' or DNS)")
        if resolution == "DNS_ROUND_ROBIN" and len(self.endpoints) > 1:
            raise ValueError("DNS_ROUND_ROBIN mode cannot have multiple endpoints")
        numbers = [p.number for p in self.ports]
        if len(numbers) != len(set(numbers)):
            raise ValueError("port number cannot be duplicated")
        return self


# --------------------------------------------------------------------------- Gateway

_TLS_VERSIONS = Literal["TLS_AUTO", "TLSV1_0", "TLSV1_1", "TLSV1_2", "TLSV1_3"]


class Port(IstioModel):
    number: UInt32
    protocol: str
    name: str
    target_port: UInt32 | None = None


class TLSCertificate(IstioModel):
    server_certificate: str | None = None
    private_key: str | None = None
    ca_certificates: str | None = None


class ServerTLSSettings(IstioModel):
    https_redirect: bool | None = None
    mode: (
        Literal[
            "PASSTHROUGH", "SIMPLE", "MUTUAL", "AUTO_PASSTHROUGH", "ISTIO_MUTUAL", "OPTIONAL_MUTUAL"
        ]
        | None
    ) = None
    server_certificate: str | None = None
    private_key: str | None = None
    ca_certificates: str | None = None
    ca_crl: str | None = None
    credential_name: str | None = None
    credential_names: list[str] = Field(default_factory=list)
    tls_certificates: list[TLSCertificate] = Field(default_factory=list)
    subject_alt_names: list[str] = Field(default_factory=list)
    verify_certificate_spki: list[str] = Field(default_factory=list)
    verify_certificate_hash: list[str] = Field(default_factory=list)
    min_protocol_version: _TLS_VERSIONS | None = None
    max_protocol_version: _TLS_VERSIONS | None = None
    cipher_suites: list[str] = Field(default_factory=list)
    insecure_skip_verify: bool | None = None
    ca_cert_credential_name: str | None = None

    @model_validator(mode="after")
    def _one_credential(self) -> ServerTLSSettings:
        fields = self.model_fields_set
        for a, b in (
            ("credential_names", "tls_certificates"),
            ("credential_name", "credential_names"),
            ("credential_name", "tls_certificates"),
        ):
            if a in fields and b in fields:
                raise ValueError(f"only one of {to_camel(a)} or {to_camel(b)} can be set")
        for f in ("credential_names", "tls_certificates"):
            if f in fields and not 1 <= len(getattr(self, f)) <= 2:
                raise ValueError(f"{to_camel(f)} must have 1 or 2 entries")
        return self


class Server(IstioModel):
    port: Port
    bind: str | None = None
    hosts: list[str]
    tls: ServerTLSSettings | None = None
    default_endpoint: str | None = None
    name: str | None = None


class Gateway(IstioModel):
    servers: list[Server] = Field(default_factory=list)
    selector: dict[str, str] = Field(default_factory=dict)


# --------------------------------------------------------------------------- Sidecar


class SidecarPort(IstioModel):
    number: UInt32 | None = None
    protocol: str | None = None
    name: str | None = None
    target_port: UInt32 | None = None


_CAPTURE = Literal["DEFAULT", "IPTABLES", "NONE"]


class IstioIngressListener(IstioModel):
    port: SidecarPort
    bind: str | None = None
    capture_mode: _CAPTURE | None = None
    default_endpoint: str | None = None
    tls: ServerTLSSettings | None = None
    connection_pool: ConnectionPoolSettings | None = None


class IstioEgressListener(IstioModel):
    port: SidecarPort | None = None
    bind: str | None = None
    capture_mode: _CAPTURE | None = None
    hosts: list[str]


class OutboundTrafficPolicy(IstioModel):
    mode: Literal["REGISTRY_ONLY", "ALLOW_ANY"] | None = None
    egress_proxy: Destination | None = None


class Sidecar(IstioModel):
    workload_selector: WorkloadSelector | None = None
    ingress: list[IstioIngressListener] = Field(default_factory=list)
    egress: list[IstioEgressListener] = Field(default_factory=list)
    inbound_connection_pool: ConnectionPoolSettings | None = None
    outbound_traffic_policy: OutboundTrafficPolicy | None = None
