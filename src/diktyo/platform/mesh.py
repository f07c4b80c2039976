"""The mesh file (``mesh.yaml``): which services and workloads ``diktyo up`` runs, and how.

Format reference: ``docs/mesh-file.md`` (JSON schema ``docs/mesh.schema.json``). Loaded with
ruamel.yaml so every error names ``FILE:LINE:COL``; validated by pydantic models below with
unknown fields rejected. ``load_mesh(path) -> MeshSpec`` raises ``MeshFileError`` listing every
problem.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError

from diktyo.api.limits import ParseLimitError, check_yaml

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")

# Istio's protocol selection by port name prefix (``http-web``, ``grpc``, ``tcp-db`` ...).
_PREFIXES = {
    "http2": "HTTP2",
    "http": "HTTP",
    "https": "HTTPS",
    "grpc-web": "HTTP",
    "grpc": "GRPC",
    "tcp": "TCP",
    "tls": "TLS",
    "mongo": "TCP",
    "redis": "TCP",
    "mysql": "TCP",
}
_APP_PROTOCOLS = {
    "http": "HTTP",
    "http2": "HTTP2",
    "h2c": "HTTP2",
    "grpc": "GRPC",
    "tcp": "TCP",
    "tls": "TLS",
    "https": "HTTPS",
}


class MeshFileError(ValueError):
    """A mesh file that cannot be used; ``problems`` are ``FILE:LINE:COL: error: ...`` lines."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class _M(BaseModel):
    model_config = ConfigDict(
        extra="forbid", alias_generator=to_camel, populate_by_name=True, frozen=True
    )


def _dns_name(v: str) -> str:
    if not _DNS_LABEL.match(v) or len(v) > 63:
        raise ValueError(
            f"{v!r} is not a valid name: use lower-case letters, digits and '-' (like 'reviews-v2')"
        )
    return v


class PortSpec(_M):
    name: str = "http"
    port: int = Field(ge=1, le=65535)
    app_protocol: str | None = None

    @field_validator("app_protocol")
    @classmethod
    def _app_protocol(cls, v: str | None) -> str | None:
        if v is not None and v.lower() not in _APP_PROTOCOLS:
            raise ValueError(
                f"unknown appProtocol {v!r}; use one of {', '.join(sorted(_APP_PROTOCOLS))}"
            )
        return v

    @property
    def protocol(self) -> str:
        """HTTP | HTTP2 | GRPC | TCP | TLS | HTTPS, from appProtocol or the Istio port name."""
        if self.app_protocol:
            return _APP_PROTOCOLS[self.app_protocol.lower()]
        name = self.name.lower()
        for prefix in sorted(_PREFIXES, key=len, reverse=True):
            if name == prefix or name.startswith(prefix + "-"):
                return _PREFIXES[prefix]
        return "HTTP"


class ServiceSpec(_M):
    name: str
    namespace: str | None = None
    selector: dict[str, str] | None = None  # default {app: name}
    ports: list[PortSpec] = Field(min_length=1)

    _n = field_validator("name")(classmethod(lambda cls, v: _dns_name(v)))

    @model_validator(mode="after")
    def _unique_ports(self) -> ServiceSpec:
        numbers = [p.port for p in self.ports]
        if len(set(numbers)) != len(numbers):
            raise ValueError(f"service {self.name}: port numbers must be unique, got {numbers}")
        return self


class WorkloadSpec(_M):
    name: str
    namespace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    replicas: int = Field(default=1, ge=0, le=50)
    service_account: str = "default"
    command: list[str] | str
    env: dict[str, str] = Field(default_factory=dict)
    working_dir: str | None = None
    # the app's uid/gid (diktyo must run as root), like a pod's securityContext.runAsUser
    run_as_user: int | None = Field(default=None, ge=0, le=2**31 - 1)
    run_as_group: int | None = Field(default=None, ge=0, le=2**31 - 1)
    # pod annotations; with capture: transparent, Istio's traffic.sidecar.istio.io/* ones shape
    # the replica's capture rules (includeInboundPorts, excludeOutboundPorts, ...)
    annotations: dict[str, str] = Field(default_factory=dict)

    _n = field_validator("name")(classmethod(lambda cls, v: _dns_name(v)))

    @field_validator("annotations")
    @classmethod
    def _annotations(cls, v: dict[str, str]) -> dict[str, str]:
        from diktyo.platform.capture_rules import from_annotations

        from_annotations(v)  # a bad port list or CIDR is an error when loading, not at start
        from diktyo.core.proxy_config import annotation_concurrency

        annotation_concurrency(v)  # proxy.istio.io/config: a bad ProxyConfig too
        return v

    @field_validator("command")
    @classmethod
    def _command(cls, v: list[str] | str) -> list[str]:
        argv = shlex.split(v) if isinstance(v, str) else list(v)
        if not argv:
            raise ValueError("command must not be empty: give the program and its arguments")
        return argv

    @property
    def argv(self) -> list[str]:
        return list(self.command) if isinstance(self.command, list) else shlex.split(self.command)


class GatewayPortSpec(_M):
    port: int = Field(default=8080, ge=1, le=65535)  # the Gateway resource's server port number
    host_port: int = Field(default=8080, ge=0, le=65535)  # where it listens on 127.0.0.1 (0 = pick)


class GatewaySpec(_M):
    name: str = "istio-ingressgateway"
    namespace: str = "istio-system"
    labels: dict[str, str] = Field(
        default_factory=lambda: {"istio": "ingressgateway", "app": "istio-ingressgateway"}
    )
    service_account: str = "istio-ingressgateway-service-account"
    ports: list[GatewayPortSpec] = Field(default_factory=lambda: [GatewayPortSpec()])

    _n = field_validator("name")(classmethod(lambda cls, v: _dns_name(v)))


class OutboundTrafficPolicySpec(_M):
    """Istio's ``meshConfig.outboundTrafficPolicy``: where captured connections to destinations
    outside the registry go (transparent mode; a Sidecar resource may override it)."""

    mode: Literal["ALLOW_ANY", "REGISTRY_ONLY"] = "ALLOW_ANY"


class ControlPlaneSpec(_M):
    port: int = Field(default=0, ge=0, le=65535)  # 0 = pick a free port


class TracingSpec(_M):
    """Mesh-wide tracing, like Istio's ``meshConfig.defaultConfig.tracing``."""

    sampling: float = Field(default=1.0, ge=0.0, le=100.0)  # percent; Istio's default is 1 %
    # an extra OTLP/HTTP collector (Jaeger, Tempo, an OpenTelemetry Collector), e.g.
    # http://127.0.0.1:4318/v1/traces; unset = the control plane's embedded trace store
    otlp_endpoint: str | None = None


class AccessLogSpec(_M):
    """Sidecar access logs, like Istio's ``meshConfig.accessLogFile`` / ``accessLogEncoding``."""

    enabled: bool = False
    format: str = Field(default="text", pattern="^(text|json)$")


class RestartSpec(_M):
    """Restarts of crashed apps and sidecars, like Kubernetes' ``restartPolicy`` and
    CrashLoopBackOff: the first restart is immediate, then ``backoffBase`` seconds, doubling up
    to ``backoffMax``; a container that ran ``resetAfter`` seconds starts the series again."""

    policy: str = Field(default="Always", pattern="^(Always|OnFailure|Never)$")
    backoff_base: float = Field(default=10.0, gt=0, le=3600)  # seconds (Kubernetes: 10 s)
    backoff_max: float = Field(default=300.0, gt=0, le=86400)  # seconds (Kubernetes: 5 min)
    reset_after: float = Field(default=600.0, gt=0, le=86400)  # seconds (Kubernetes: 10 min)

    @model_validator(mode="after")
    def _order(self) -> RestartSpec:
        if self.backoff_max < self.backoff_base:
            raise ValueError(
                f"backoffMax ({self.backoff_max:g}) must not be below backoffBase "
                f"({self.backoff_base:g})"
            )
        return self


class SidecarSpec(_M):
    """How sidecars run. ``runAsUser``: their own uid, apart from the apps' (diktyo must run as
    root), as Istio's ``istio-proxy`` container runs as uid 1337."""

    run_as_user: int | None = Field(default=None, ge=0, le=2**31 - 1)
    run_as_group: int | None = Field(default=None, ge=0, le=2**31 - 1)
    # Istio's meshConfig.defaultConfig.concurrency: every sidecar's worker processes (0 = one
    # per core); a workload's proxy.istio.io/config annotation overrides it. Unset: 1
    concurrency: int | None = Field(default=None, ge=0, le=64)


class NetworkSpec(_M):
    """Transparent mode's network: one private range (the bridge, one address per workload
    instance, the services' virtual IPs) and the name prefixes of what diktyo creates."""

    cidr: str = "10.209.0.0/16"
    name_prefix: str = Field(default="diktyo-", pattern=r"^[a-z][a-z0-9-]{0,19}$")
    link_prefix: str = Field(default="dk", pattern=r"^[a-z][a-z0-9]{0,5}$")

    @field_validator("cidr")
    @classmethod
    def _cidr(cls, v: str) -> str:
        from diktyo.platform.capture_netns import AddressPlan

        AddressPlan(v)  # raises ValueError with the reason
        return v


class MeshSpec(_M):
    api_version: str = "diktyo.io/v1alpha1"
    kind: str = "Mesh"
    name: str = "mesh"
    namespace: str = "default"
    config: str | None = None  # folder of Istio YAML, relative to the mesh file
    control_plane: ControlPlaneSpec = Field(default_factory=ControlPlaneSpec)
    services: list[ServiceSpec] = Field(default_factory=list)
    workloads: list[WorkloadSpec] = Field(default_factory=list)
    gateways: list[GatewaySpec] = Field(default_factory=list)
    tracing: TracingSpec = Field(default_factory=TracingSpec)
    access_log: AccessLogSpec = Field(default_factory=AccessLogSpec)
    # Istio's meshConfig.outboundTrafficPolicy and protocolDetectionTimeout (transparent mode)
    outbound_traffic_policy: OutboundTrafficPolicySpec = Field(
        default_factory=OutboundTrafficPolicySpec
    )
    # a duration ("100ms", "1s"); "0s" = no timeout (Istio's default since 1.8)
    protocol_detection_timeout: str = "0s"

    @field_validator("protocol_detection_timeout")
    @classmethod
    def _detection_timeout(cls, v: str) -> str:
        from diktyo.api.duration import parse_duration

        parse_duration(v)  # raises ValueError: "invalid duration '...'"
        return v
    restart: RestartSpec = Field(default_factory=RestartSpec)
    sidecar: SidecarSpec = Field(default_factory=SidecarSpec)
    # proxy: apps use HTTP_PROXY; transparent: each instance in its own network namespace,
    # iptables sends its traffic through the sidecar; auto (default): transparent when
    # possible. Unset in the file, $DIKTYO_CAPTURE decides (the test suite sets proxy).
    capture: str = Field(default="auto", pattern="^(proxy|transparent|auto)$")
    network: NetworkSpec = Field(default_factory=NetworkSpec)
    # set by load_mesh: the folder relative paths are resolved against
    base_dir: str = Field(default=".", exclude=True)

    @field_validator("kind")
    @classmethod
    def _kind(cls, v: str) -> str:
        if v != "Mesh":
            raise ValueError(
                f"kind must be 'Mesh', got {v!r} (is this an Istio config file? pass it with --config)"
            )
        return v

    @model_validator(mode="after")
    def _cross_checks(self) -> MeshSpec:
        problems = []
        for kind, items in (
            ("service", self.services),
            ("workload", self.workloads),
            ("gateway", self.gateways),
        ):
            seen: set[tuple[str, str]] = set()
            for item in items:
                key = (item.namespace or self.namespace, item.name)
                if key in seen:
                    problems.append(f"duplicate {kind} {key[1]!r} in namespace {key[0]!r}")
                seen.add(key)
        host_ports = [p.host_port for g in self.gateways for p in g.ports if p.host_port]
        if len(set(host_ports)) != len(host_ports):
            problems.append(f"gateway hostPorts must be unique, got {host_ports}")
        for svc in self.services:
            if not any(self.selects(svc, w) for w in self.workloads):
                sel = self.selector(svc)
                problems.append(
                    f"service {svc.name!r} selects no workload (selector {sel}); give a workload "
                    f"labels {sel} or set the service's selector"
                )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    # ------------------------------------------------------------------ helpers

    def ns(self, item: ServiceSpec | WorkloadSpec) -> str:
        return item.namespace or self.namespace

    @staticmethod
    def selector(svc: ServiceSpec) -> dict[str, str]:
        return dict(svc.selector) if svc.selector is not None else {"app": svc.name}

    def selects(self, svc: ServiceSpec, wl: WorkloadSpec) -> bool:
        sel = self.selector(svc)
        return self.ns(svc) == self.ns(wl) and all(wl.labels.get(k) == v for k, v in sel.items())

    def services_of(self, wl: WorkloadSpec) -> list[ServiceSpec]:
        return [s for s in self.services if self.selects(s, wl)]

    def config_dir(self) -> Path | None:
        return (Path(self.base_dir) / self.config).resolve() if self.config else None


def fqdn(name: str, namespace: str) -> str:
    return f"{name}.{namespace}.svc.cluster.local"


# --------------------------------------------------------------------------- loading


def load_mesh(path: str | Path) -> MeshSpec:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise MeshFileError(
            [f"{path}: error: cannot read mesh file: {exc.strerror or exc}"]
        ) from None
    return load_mesh_text(text, str(path), base_dir=str(path.resolve().parent))


def load_mesh_text(text: str, filename: str = "mesh.yaml", base_dir: str = ".") -> MeshSpec:
    yaml = YAML(typ="rt")
    yaml.allow_duplicate_keys = False
    try:
        check_yaml(text)  # bombs, deep nesting: refused before composing
        data = yaml.load(text)
    except ParseLimitError as exc:
        raise MeshFileError(
            [f"{filename}:{exc.line}:{exc.col}: error: {exc.message} (hint: {exc.hint})"]
        ) from None
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (0, 0)
        raise MeshFileError(
            [f"{filename}:{line}:{col}: error: invalid YAML: {exc.problem or exc}"]
        ) from None
    except Exception as exc:  # noqa: BLE001 - ruamel raises several unrelated types
        raise MeshFileError([f"{filename}: error: invalid YAML: {exc}"]) from None
    if not isinstance(data, dict):
        raise MeshFileError(
            [f"{filename}:1:1: error: a mesh file is a mapping with services and workloads"]
        )
    plain = _plain(data)
    plain.pop("baseDir", None)
    try:
        spec = MeshSpec.model_validate(plain)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            line, col = _position(data, loc)
            field = _loc_text(loc)
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = f"unknown field {loc[-1]!r} (see docs/mesh-file.md for the fields)"
            elif err["type"] == "missing":
                msg = f"missing required field {loc[-1]!r}"
            problems.append(f"{filename}:{line}:{col}: error: {field + ': ' if field else ''}{msg}")
        raise MeshFileError(problems) from None
    return spec.model_copy(update={"base_dir": base_dir})


def _plain(node: Any) -> Any:
    if isinstance(node, CommentedMap | dict):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, CommentedSeq | list):
        return [_plain(v) for v in node]
    return node


def _position(data: Any, loc: tuple[Any, ...]) -> tuple[int, int]:
    line, col = 1, 1
    node = data
    for key in loc:
        try:
            if isinstance(node, CommentedMap) and key in node:
                line, col = node.lc.key(key)
                line, col = line + 1, col + 1
                node = node[key]
            elif isinstance(node, CommentedSeq) and isinstance(key, int) and key < len(node):
                line, col = node.lc.item(key)
                line, col = line + 1, col + 1
                node = node[key]
            else:
                break
        except (KeyError, TypeError, AttributeError):
            break
    return line, col


def _loc_text(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif (
            isinstance(part, str)
            and not part.startswith("function-")
            and part not in ("list[str]", "str")
        ):
            out += f".{part}" if out else part
    return out


def mesh_config(spec: MeshSpec) -> Any:
    """The snapshot's mesh-wide settings from the mesh file (tracing, access log, capture)."""
    from diktyo.api.duration import parse_duration
    from diktyo.snapshot.model import AccessLog, MeshConfig, Tracing

    return MeshConfig(
        tracing=Tracing(sampling=spec.tracing.sampling, otlp_endpoint=spec.tracing.otlp_endpoint),
        access_log=AccessLog(enabled=spec.access_log.enabled, format=spec.access_log.format),  # type: ignore[arg-type]
        outbound_traffic_policy=spec.outbound_traffic_policy.mode,
        protocol_detection_timeout=parse_duration(spec.protocol_detection_timeout),
    )


def json_schema() -> dict[str, Any]:
    """The JSON schema of the mesh file (``docs/mesh.schema.json`` is generated from it)."""
    schema = MeshSpec.model_json_schema(by_alias=True)
    schema["properties"].pop("baseDir", None)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://diktyo.io/schemas/mesh.schema.json"
    schema["title"] = "diktyo mesh file (mesh.yaml)"
    schema["description"] = (
        "Services, workloads and gateways that 'diktyo up' runs; see docs/mesh-file.md."
    )
    return schema
