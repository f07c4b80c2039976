"""Istio's VM kinds: WorkloadEntry (one non-Kubernetes workload) and WorkloadGroup (its template).

Field names, types and rules follow Istio's CRDs (``workloadentries`` / ``workloadgroups``):
the loader checks a document against the CRD's OpenAPI schema first (``api.crd_schema``),
then these models apply the CEL rules of the CRD (``x-kubernetes-validations``), which the
schema check does not evaluate. ``WorkloadEntry``'s spec model is the one a ServiceEntry's
``endpoints`` use (``api.networking.WorkloadEntry``).
"""

from __future__ import annotations

import re

from pydantic import Field, model_validator

from diktyo.api.base import IstioModel, NonNegInt, UInt32
from diktyo.api.networking import WorkloadEntry

__all__ = [
    "ExecHealthCheckConfig",
    "GrpcHealthCheckConfig",
    "HTTPHeader",
    "HTTPHealthCheckConfig",
    "ReadinessProbe",
    "TCPHealthCheckConfig",
    "WorkloadEntry",
    "WorkloadGroup",
    "WorkloadGroupMetadata",
    "WorkloadTemplate",
]


_PORT_NAME = re.compile(r"^[a-zA-Z0-9](?:[-a-zA-Z0-9]*[a-zA-Z0-9])?$")


def _port(value: int | None) -> None:
    if value is not None and not 0 < value <= 65535:
        raise ValueError("port must be between 1-65535")


def _check_uds(address: str | None, has_ports: bool) -> None:
    if not address or not address.startswith("unix://"):
        return
    rest = address[len("unix://") :]
    if rest[:1] not in ("/", "@"):
        raise ValueError("UDS must be an absolute path or abstract socket")
    if address.endswith("/"):
        raise ValueError("UDS may not be a dir")
    if has_ports:
        raise ValueError("UDS may not include ports")


class HTTPHeader(IstioModel):
    name: str | None = None
    value: str | None = None


class HTTPHealthCheckConfig(IstioModel):
    path: str | None = None
    port: UInt32
    host: str | None = None
    scheme: str | None = None
    http_headers: list[HTTPHeader] = Field(default_factory=list)

    @model_validator(mode="after")
    def _rules(self) -> HTTPHealthCheckConfig:
        _port(self.port)
        if self.scheme not in (None, "", "HTTP", "HTTPS"):
            raise ValueError("scheme must be one of [HTTP, HTTPS]")
        return self


class TCPHealthCheckConfig(IstioModel):
    host: str | None = None
    port: UInt32

    @model_validator(mode="after")
    def _rules(self) -> TCPHealthCheckConfig:
        _port(self.port)
        return self


class ExecHealthCheckConfig(IstioModel):
    command: list[str]


class GrpcHealthCheckConfig(IstioModel):
    port: UInt32 | None = None
    service: str | None = None

    @model_validator(mode="after")
    def _rules(self) -> GrpcHealthCheckConfig:
        _port(self.port)
        return self


class ReadinessProbe(IstioModel):
    """``WorkloadGroup.probe``: Kubernetes' probe fields; one of httpGet, tcpSocket, exec, grpc."""

    initial_delay_seconds: NonNegInt | None = None
    timeout_seconds: NonNegInt | None = None
    period_seconds: NonNegInt | None = None
    success_threshold: NonNegInt | None = None
    failure_threshold: NonNegInt | None = None
    http_get: HTTPHealthCheckConfig | None = None
    tcp_socket: TCPHealthCheckConfig | None = None
    exec: ExecHealthCheckConfig | None = None
    grpc: GrpcHealthCheckConfig | None = None

    @model_validator(mode="after")
    def _one_method(self) -> ReadinessProbe:
        methods = [m for m in ("http_get", "tcp_socket", "exec", "grpc") if getattr(self, m)]
        if len(methods) > 1:
            raise ValueError("only one of exec, grpc, httpGet, tcpSocket may be set")
        return self

    def effective(self) -> dict[str, float]:
        """Istio's agent defaults (``fillInDefaults``): thresholds 1, timeout 1 s, period 10 s."""
        return {
            "initial_delay": float(self.initial_delay_seconds or 0),
            "timeout": float(self.timeout_seconds or 1),
            "period": float(self.period_seconds or 10),
            "success_threshold": float(self.success_threshold or 1),
            "failure_threshold": float(self.failure_threshold or 1),
        }


class WorkloadTemplate(IstioModel):
    """``WorkloadGroup.template``: a WorkloadEntry without the address rule (each instance
    brings its own address when it registers)."""

    address: str | None = Field(default=None, max_length=256)
    ports: dict[str, UInt32] = Field(default_factory=dict, max_length=128)
    labels: dict[str, str] = Field(default_factory=dict, max_length=256)
    network: str | None = Field(default=None, max_length=2048)
    locality: str | None = Field(default=None, max_length=2048)
    weight: UInt32 | None = None
    service_account: str | None = Field(default=None, max_length=253)

    @model_validator(mode="after")
    def _rules(self) -> WorkloadTemplate:
        for name, port in self.ports.items():
            if len(name) >= 63 or not _PORT_NAME.match(name):
                raise ValueError(f"port name {name!r} must be valid (letters, digits, '-')")
            _port(port)
        _check_uds(self.address, bool(self.ports))
        return self


class WorkloadGroupMetadata(IstioModel):
    labels: dict[str, str] = Field(default_factory=dict, max_length=256)
    annotations: dict[str, str] = Field(default_factory=dict, max_length=256)


class WorkloadGroup(IstioModel):
    """A template for the WorkloadEntries of workloads that register themselves."""

    metadata: WorkloadGroupMetadata | None = None
    template: WorkloadTemplate
    probe: ReadinessProbe | None = None
