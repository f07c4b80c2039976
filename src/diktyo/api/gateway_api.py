"""Kubernetes Gateway API schemas (gateway.networking.k8s.io): Gateway, HTTPRoute, GRPCRoute,
ReferenceGrant.

Field names, enums and limits follow the Gateway API v1 CRDs (standard channel); unknown fields
are errors, as for Istio's kinds.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from diktyo.api.base import IstioModel, check_regex

GATEWAY_API = "gateway.networking.k8s.io"

# GEP-2257 durations: 1 to 4 parts of up to 5 digits with h, m, s or ms ("10s", "1h30m")
_DURATION = re.compile(r"^([0-9]{1,5}(h|ms|m|s)){1,4}$")
_DURATION_PART = re.compile(r"([0-9]{1,5})(h|ms|m|s)")
_UNIT = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
# RFC 1123 hostname, optionally with one leading wildcard label (Gateway API's Hostname type)
_HOSTNAME = re.compile(r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
# header names: RFC 7230 token
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+\-.^_`|~]+$")

PortNumber = Annotated[int, Field(ge=1, le=65535)]
Weight = Annotated[int, Field(ge=0, le=1000000)]


def parse_gateway_duration(value: str) -> float:
    """A Gateway API duration (GEP-2257) in seconds: ``"1h30m"`` -> 5400.0."""
    if not _DURATION.match(value):
        raise ValueError(
            f"invalid duration {value!r}: Gateway API durations are 1 to 4 parts of a number "
            "(up to 5 digits) with h, m, s or ms, e.g. '10s', '500ms', '1h30m'"
        )
    return sum(float(n) * _UNIT[u] for n, u in _DURATION_PART.findall(value))


def _repeated(names: list[str]) -> list[str]:
    """The names that occur more than once (sorted): list-map keys the API server refuses."""
    return sorted({n for n in names if names.count(n) > 1})


def _hostname(v: str) -> str:
    if len(v) > 253 or not _HOSTNAME.match(v):
        raise ValueError(
            f"invalid hostname {v!r}: lower case RFC 1123 names, optionally starting with one "
            "'*.' label (IP addresses are not allowed)"
        )
    return v


class GatewayApiModel(IstioModel):
    """Gateway API objects: camelCase, strict, unknown fields rejected (as Istio's kinds)."""


# --------------------------------------------------------------------------- references


class ParentReference(GatewayApiModel):
    group: str | None = None  # default gateway.networking.k8s.io; "" = core (Service)
    kind: str | None = None  # default Gateway
    namespace: str | None = None
    name: Annotated[str, Field(min_length=1, max_length=253)]
    section_name: str | None = None
    port: PortNumber | None = None


class BackendObjectReference(GatewayApiModel):
    group: str | None = None  # default "" (core)
    kind: str | None = None  # default Service
    name: Annotated[str, Field(min_length=1, max_length=253)]
    namespace: str | None = None
    port: PortNumber | None = None

    @model_validator(mode="after")
    def _port(self) -> BackendObjectReference:
        if not self.group and self.kind in (None, "Service") and self.port is None:
            raise ValueError("must have port for Service reference")
        return self


# --------------------------------------------------------------------------- Gateway


class SecretObjectReference(GatewayApiModel):
    group: str | None = None
    kind: str | None = None
    name: str
    namespace: str | None = None


class GatewayTLSConfig(GatewayApiModel):
    mode: Literal["Terminate", "Passthrough"] = "Terminate"
    certificate_refs: list[SecretObjectReference] = Field(default_factory=list)
    options: dict[str, str] = Field(default_factory=dict)


class LabelSelectorRequirement(GatewayApiModel):
    key: str
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: list[str] = Field(default_factory=list)


class NamespaceSelector(GatewayApiModel):
    match_labels: dict[str, str] = Field(default_factory=dict)
    match_expressions: list[LabelSelectorRequirement] = Field(default_factory=list)


class RouteNamespaces(GatewayApiModel):
    from_: Literal["All", "Same", "Selector"] = Field(default="Same", alias="from")
    selector: NamespaceSelector | None = None

    @model_validator(mode="after")
    def _selector(self) -> RouteNamespaces:
        if self.from_ == "Selector" and self.selector is None:
            raise ValueError("selector must be specified when from is Selector")
        return self


class RouteGroupKind(GatewayApiModel):
    group: str | None = None
    kind: str


class AllowedRoutes(GatewayApiModel):
    namespaces: RouteNamespaces = Field(default_factory=RouteNamespaces)
    kinds: list[RouteGroupKind] = Field(default_factory=list)


class Listener(GatewayApiModel):
    name: Annotated[str, Field(min_length=1, max_length=253)]
    hostname: str | None = None
    port: PortNumber
    protocol: Annotated[str, Field(min_length=1, max_length=255)]
    tls: GatewayTLSConfig | None = None
    allowed_routes: AllowedRoutes = Field(default_factory=AllowedRoutes)

    @field_validator("hostname")
    @classmethod
    def _host(cls, v: str | None) -> str | None:
        return None if v is None else _hostname(v)

    @model_validator(mode="after")
    def _tls(self) -> Listener:
        if self.protocol == "HTTPS" and self.tls is None:
            raise ValueError("tls must be specified for protocol HTTPS")
        if self.protocol in ("HTTP", "TCP", "UDP") and self.tls is not None:
            raise ValueError(f"tls must not be specified for protocol {self.protocol}")
        return self


class GatewayAddress(GatewayApiModel):
    type: str | None = None
    value: str


class GatewayInfrastructure(GatewayApiModel):
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    parameters_ref: dict[str, str] | None = None


class GatewaySpec(GatewayApiModel):
    gateway_class_name: Annotated[str, Field(min_length=1, max_length=253)]
    listeners: Annotated[list[Listener], Field(min_length=1, max_length=64)]
    addresses: list[GatewayAddress] = Field(default_factory=list)
    infrastructure: GatewayInfrastructure | None = None

    @model_validator(mode="after")
    def _unique(self) -> GatewaySpec:
        dup = _repeated([lst.name for lst in self.listeners])
        if dup:
            raise ValueError(f"listener names must be unique within a Gateway, repeated: {dup}")
        return self


# --------------------------------------------------------------------------- HTTPRoute

HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")


class HTTPPathMatch(GatewayApiModel):
    type: Literal["Exact", "PathPrefix", "RegularExpression"] = "PathPrefix"
    value: Annotated[str, Field(max_length=1024)] = "/"

    @model_validator(mode="after")
    def _value(self) -> HTTPPathMatch:
        if self.type == "RegularExpression":
            check_regex(self.value)
        elif not self.value.startswith("/"):
            raise ValueError(f"path value {self.value!r} must be an absolute path (start with '/')")
        elif "//" in self.value or "/./" in self.value or "/../" in self.value:
            raise ValueError(f"path value {self.value!r} must not contain '//', '/./' or '/../'")
        return self


class HTTPHeaderMatch(GatewayApiModel):
    type: Literal["Exact", "RegularExpression"] = "Exact"
    name: Annotated[str, Field(min_length=1, max_length=256)]
    value: Annotated[str, Field(max_length=4096)]

    @model_validator(mode="after")
    def _check(self) -> HTTPHeaderMatch:
        if not _HEADER_NAME.match(self.name):
            raise ValueError(f"invalid header name {self.name!r}")
        if self.type == "RegularExpression":
            check_regex(self.value)
        return self


class HTTPQueryParamMatch(HTTPHeaderMatch):
    pass


class HTTPRouteMatch(GatewayApiModel):
    path: HTTPPathMatch = Field(default_factory=HTTPPathMatch)  # the CRD's default: PathPrefix /
    headers: list[HTTPHeaderMatch] = Field(default_factory=list, max_length=16)
    query_params: list[HTTPQueryParamMatch] = Field(default_factory=list, max_length=16)
    method: Literal[HTTP_METHODS] | None = None  # type: ignore[valid-type]  # Literal over a tuple constant

    @model_validator(mode="after")
    def _unique(self) -> HTTPRouteMatch:
        # listMapKey=name: the API server refuses repeated names (case variants pass; the
        # first of them is used)
        for what, items in (("header", self.headers), ("query param", self.query_params)):
            dup = _repeated([m.name for m in items])
            if dup:
                raise ValueError(f"{what} names must be unique within a match, repeated: {dup}")
        return self


class HTTPHeader(GatewayApiModel):
    name: Annotated[str, Field(min_length=1, max_length=256)]
    value: Annotated[str, Field(max_length=4096)]


class HTTPHeaderFilter(GatewayApiModel):
    set: list[HTTPHeader] = Field(default_factory=list, max_length=16)
    add: list[HTTPHeader] = Field(default_factory=list, max_length=16)
    remove: list[str] = Field(default_factory=list, max_length=16)


class HTTPPathModifier(GatewayApiModel):
    type: Literal["ReplaceFullPath", "ReplacePrefixMatch"]
    replace_full_path: str | None = None
    replace_prefix_match: str | None = None

    @model_validator(mode="after")
    def _one(self) -> HTTPPathModifier:
        if self.type == "ReplaceFullPath":
            if self.replace_full_path is None or self.replace_prefix_match is not None:
                raise ValueError(
                    "replaceFullPath must be set (and replacePrefixMatch not) when type is "
                    "ReplaceFullPath"
                )
        elif self.replace_prefix_match is None or self.replace_full_path is not None:
            raise ValueError(
                "replacePrefixMatch must be set (and replaceFullPath not) when type is "
                "ReplacePrefixMatch"
            )
        value = self.replace_full_path or self.replace_prefix_match or ""
        if value and not value.startswith("/"):
            raise ValueError(f"path {value!r} must start with '/'")
        return self


class HTTPRequestRedirectFilter(GatewayApiModel):
    scheme: Literal["http", "https"] | None = None
    hostname: str | None = None
    path: HTTPPathModifier | None = None
    port: PortNumber | None = None
    status_code: Literal[301, 302] = 302

    @field_validator("hostname")
    @classmethod
    def _host(cls, v: str | None) -> str | None:
        if v is not None and "*" in v:
            raise ValueError(f"invalid redirect hostname {v!r}: wildcards are not allowed")
        return None if v is None else _hostname(v)


class HTTPURLRewriteFilter(GatewayApiModel):
    hostname: str | None = None
    path: HTTPPathModifier | None = None

    @field_validator("hostname")
    @classmethod
    def _host(cls, v: str | None) -> str | None:
        if v is not None and "*" in v:
            raise ValueError(f"invalid rewrite hostname {v!r}: wildcards are not allowed")
        return None if v is None else _hostname(v)


class Fraction(GatewayApiModel):
    numerator: Annotated[int, Field(ge=0)]
    denominator: Annotated[int, Field(ge=1)] = 100

    @model_validator(mode="after")
    def _le(self) -> Fraction:
        if self.numerator > self.denominator:
            raise ValueError("numerator must be less than or equal to denominator")
        return self


class HTTPRequestMirrorFilter(GatewayApiModel):
    backend_ref: BackendObjectReference
    percent: Annotated[int, Field(ge=0, le=100)] | None = None
    fraction: Fraction | None = None

    @model_validator(mode="after")
    def _one(self) -> HTTPRequestMirrorFilter:
        if self.percent is not None and self.fraction is not None:
            raise ValueError("only one of percent or fraction may be specified")
        return self


class LocalObjectReference(GatewayApiModel):
    group: str
    kind: str
    name: str


FilterType = Literal[
    "RequestHeaderModifier",
    "ResponseHeaderModifier",
    "RequestMirror",
    "RequestRedirect",
    "URLRewrite",
    "ExtensionRef",
]
_FILTER_FIELD = {
    "RequestHeaderModifier": "request_header_modifier",
    "ResponseHeaderModifier": "response_header_modifier",
    "RequestMirror": "request_mirror",
    "RequestRedirect": "request_redirect",
    "URLRewrite": "url_rewrite",
    "ExtensionRef": "extension_ref",
}


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.title() for p in rest)


class HTTPRouteFilter(GatewayApiModel):
    type: FilterType
    request_header_modifier: HTTPHeaderFilter | None = None
    response_header_modifier: HTTPHeaderFilter | None = None
    request_mirror: HTTPRequestMirrorFilter | None = None
    request_redirect: HTTPRequestRedirectFilter | None = None
    url_rewrite: HTTPURLRewriteFilter | None = None
    extension_ref: LocalObjectReference | None = None

    @model_validator(mode="after")
    def _matching_field(self) -> HTTPRouteFilter:
        want = _FILTER_FIELD[self.type]
        for fname in _FILTER_FIELD.values():
            alias = _camel(fname)
            if fname == want and getattr(self, fname) is None:
                raise ValueError(f"filter.{alias} must be specified for type {self.type}")
            if fname != want and getattr(self, fname) is not None:
                raise ValueError(f"filter.{alias} must be nil if the filter type is {self.type}")
        return self


class HTTPBackendRef(BackendObjectReference):
    weight: Weight = 1
    filters: list[HTTPRouteFilter] = Field(default_factory=list, max_length=16)


class HTTPRouteTimeouts(GatewayApiModel):
    request: str | None = None
    backend_request: str | None = None

    @field_validator("request", "backend_request")
    @classmethod
    def _duration(cls, v: str | None) -> str | None:
        if v is not None:
            parse_gateway_duration(v)
        return v

    @model_validator(mode="after")
    def _order(self) -> HTTPRouteTimeouts:
        if self.request and self.backend_request:
            req = parse_gateway_duration(self.request)
            be = parse_gateway_duration(self.backend_request)
            if req and be > req:
                raise ValueError("backendRequest timeout cannot be longer than request timeout")
        return self


def _default_matches() -> list[HTTPRouteMatch]:
    return [HTTPRouteMatch(path=HTTPPathMatch())]


class HTTPRouteRule(GatewayApiModel):
    name: str | None = None
    matches: list[HTTPRouteMatch] = Field(default_factory=_default_matches, max_length=64)
    filters: list[HTTPRouteFilter] = Field(default_factory=list, max_length=16)
    backend_refs: list[HTTPBackendRef] = Field(default_factory=list, max_length=16)
    timeouts: HTTPRouteTimeouts | None = None

    @model_validator(mode="after")
    def _filters(self) -> HTTPRouteRule:
        kinds = [f.type for f in self.filters]
        for once in ("RequestHeaderModifier", "ResponseHeaderModifier", "RequestRedirect",
                     "URLRewrite"):  # fmt: skip
            if kinds.count(once) > 1:
                raise ValueError(f"{once} filter cannot be repeated")
        if "RequestRedirect" in kinds and "URLRewrite" in kinds:
            raise ValueError("may specify either RequestRedirect or URLRewrite, but not both")
        if "RequestRedirect" in kinds and self.backend_refs:
            raise ValueError("RequestRedirect filter must not be used with backendRefs")
        for f in self.filters:
            spec = f.request_redirect or f.url_rewrite
            path = spec.path if spec is not None else None
            if path is not None and path.type == "ReplacePrefixMatch":
                for m in self.matches:
                    if m.path.type != "PathPrefix":
                        raise ValueError(
                            "ReplacePrefixMatch can only be used with a PathPrefix path match"
                        )
        return self


class HTTPRouteSpec(GatewayApiModel):
    parent_refs: list[ParentReference] = Field(default_factory=list, max_length=32)
    hostnames: list[str] = Field(default_factory=list, max_length=16)
    rules: list[HTTPRouteRule] = Field(default_factory=lambda: [HTTPRouteRule()], max_length=16)

    @field_validator("hostnames")
    @classmethod
    def _hosts(cls, v: list[str]) -> list[str]:
        return [_hostname(h) for h in v]


# --------------------------------------------------------------------------- ReferenceGrant


class ReferenceGrantFrom(GatewayApiModel):
    group: str
    kind: str
    namespace: str


class ReferenceGrantTo(GatewayApiModel):
    group: str
    kind: str
    name: str | None = None


class ReferenceGrantSpec(GatewayApiModel):
    from_: Annotated[list[ReferenceGrantFrom], Field(min_length=1, max_length=16)] = Field(
        alias="from"
    )
    to: Annotated[list[ReferenceGrantTo], Field(min_length=1, max_length=16)]


# --------------------------------------------------------------------------- GRPCRoute

# GRPCMethodMatch with type Exact: a protobuf service name (package.Service) and method name
_GRPC_SERVICE = re.compile(r"^\.?[A-Za-z_][A-Za-z_0-9]*(\.[A-Za-z_][A-Za-z_0-9]*)*$")
_GRPC_METHOD = re.compile(r"^[A-Za-z_][A-Za-z_0-9]*$")


class GRPCMethodMatch(GatewayApiModel):
    """``service`` and/or ``method`` of the ``/<service>/<method>`` path a gRPC call posts to."""

    type: Literal["Exact", "RegularExpression"] = "Exact"
    service: Annotated[str, Field(max_length=1024)] | None = None
    method: Annotated[str, Field(max_length=1024)] | None = None

    @model_validator(mode="after")
    def _check(self) -> GRPCMethodMatch:
        if self.service is None and self.method is None:
            raise ValueError("one or both of 'service' or 'method' must be specified")
        if self.type == "Exact":
            if self.service is not None and not _GRPC_SERVICE.match(self.service):
                raise ValueError(
                    f"service {self.service!r} must be a gRPC service name such as "
                    "'helloworld.Greeter' when type is Exact (use RegularExpression for a pattern)"
                )
            if self.method is not None and not _GRPC_METHOD.match(self.method):
                raise ValueError(
                    f"method {self.method!r} must be a gRPC method name such as 'SayHello' when "
                    "type is Exact (use RegularExpression for a pattern)"
                )
        else:
            for value in (self.service, self.method):
                if value is not None:
                    check_regex(value)
        return self


class GRPCRouteMatch(GatewayApiModel):
    method: GRPCMethodMatch | None = None
    headers: list[HTTPHeaderMatch] = Field(default_factory=list, max_length=16)

    @model_validator(mode="after")
    def _unique(self) -> GRPCRouteMatch:
        dup = _repeated([m.name for m in self.headers])
        if dup:
            raise ValueError(f"header names must be unique within a match, repeated: {dup}")
        return self


GRPCFilterType = Literal[
    "RequestHeaderModifier", "ResponseHeaderModifier", "RequestMirror", "ExtensionRef"
]


class GRPCRouteFilter(HTTPRouteFilter):
    """HTTPRoute's filters less the redirect and the rewrite, which GRPCRoute does not have."""

    type: GRPCFilterType


class GRPCBackendRef(BackendObjectReference):
    weight: Weight = 1
    filters: list[GRPCRouteFilter] = Field(default_factory=list, max_length=16)


class GRPCRouteRule(GatewayApiModel):
    name: str | None = None
    # none: the rule matches every gRPC call (of the route's hostnames)
    matches: list[GRPCRouteMatch] = Field(default_factory=list, max_length=64)
    filters: list[GRPCRouteFilter] = Field(default_factory=list, max_length=16)
    backend_refs: list[GRPCBackendRef] = Field(default_factory=list, max_length=16)

    @model_validator(mode="after")
    def _filters(self) -> GRPCRouteRule:
        kinds = [f.type for f in self.filters]
        for once in ("RequestHeaderModifier", "ResponseHeaderModifier"):
            if kinds.count(once) > 1:
                raise ValueError(f"{once} filter cannot be repeated")
        return self


class GRPCRouteSpec(GatewayApiModel):
    parent_refs: list[ParentReference] = Field(default_factory=list, max_length=32)
    hostnames: list[str] = Field(default_factory=list, max_length=16)
    rules: list[GRPCRouteRule] = Field(default_factory=list, max_length=16)

    @field_validator("hostnames")
    @classmethod
    def _hosts(cls, v: list[str]) -> list[str]:
        return [_hostname(h) for h in v]

    @model_validator(mode="after")
    def _total(self) -> GRPCRouteSpec:
        if sum(len(r.matches) for r in self.rules) > 128:
            raise ValueError("a GRPCRoute may have at most 128 matches across all its rules")
        return self


# --------------------------------------------------------------------------- registry

# kind -> (accepted versions, spec model); the group is GATEWAY_API
GATEWAY_API_KINDS: dict[str, tuple[tuple[str, ...], type[GatewayApiModel]]] = {
    "Gateway": (("v1", "v1beta1"), GatewaySpec),
    "HTTPRoute": (("v1", "v1beta1"), HTTPRouteSpec),
    "ReferenceGrant": (("v1", "v1beta1", "v1alpha2"), ReferenceGrantSpec),
    "GRPCRoute": (("v1", "v1alpha2"), GRPCRouteSpec),
}

# kinds that load but are not served, with why (a warning at load time): none at present
GATEWAY_API_IGNORED: dict[str, tuple[str, str]] = {}
