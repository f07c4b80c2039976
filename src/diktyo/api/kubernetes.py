"""Kubernetes objects diktyo reads beside Istio's kinds: the ``v1`` ``Service``.

Only the fields that feed the service registry are checked (ports, selector, type); a
Service has many more fields, which are Kubernetes' business and are kept unread. Checks
follow the Kubernetes API server's validation of the fields diktyo reads.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

Port = Annotated[int, Field(ge=1, le=65535)]
# IANA_SVC_NAME: at most 15 characters, lower case letters, digits and '-', one letter at least
_SVC_NAME = re.compile(r"^(?=.{1,15}$)(?=.*[a-z])[a-z0-9]([a-z0-9]|-(?!-))*(?<!-)$")
_DNS_LABEL = re.compile(r"^(?=.{1,63}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class _KubeModel(BaseModel):
    """camelCase, strict types; fields diktyo does not read are allowed and ignored."""

    model_config = ConfigDict(
        extra="ignore", alias_generator=to_camel, populate_by_name=False, strict=True, frozen=True
    )


class KubeServicePort(_KubeModel):
    """One entry of ``spec.ports`` of a Kubernetes Service."""

    name: str | None = None
    protocol: Literal["TCP", "UDP", "SCTP"] = "TCP"
    app_protocol: str | None = None
    port: Port
    target_port: int | str | None = None
    node_port: Port | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v and not _DNS_LABEL.match(v):
            raise ValueError(
                f"invalid port name {v!r}: must be lower case letters, digits and '-' "
                "(at most 63 characters)"
            )
        return v

    @field_validator("target_port")
    @classmethod
    def _target(cls, v: int | str | None) -> int | str | None:
        if isinstance(v, int) and not 1 <= v <= 65535:
            raise ValueError(f"targetPort {v} out of range: must be between 1-65535")
        if isinstance(v, str) and not _SVC_NAME.match(v):
            raise ValueError(
                f"invalid targetPort {v!r}: a port number (1-65535) or a container port name "
                "(at most 15 lower case letters, digits and '-', with a letter)"
            )
        return v


class KubeServiceSpec(_KubeModel):
    """``spec`` of a Kubernetes ``v1`` Service (the fields the registry uses)."""

    ports: list[KubeServicePort] = Field(default_factory=list)
    selector: dict[str, str] | None = None
    type: Literal["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"] = "ClusterIP"
    cluster_ip: str | None = Field(default=None, alias="clusterIP")
    external_name: str | None = None

    @model_validator(mode="after")
    def _ports(self) -> KubeServiceSpec:
        seen: set[tuple[int, str]] = set()
        names: set[str] = set()
        for p in self.ports:
            if (p.port, p.protocol) in seen:
                raise ValueError(f"duplicate port {p.port}/{p.protocol}")
            seen.add((p.port, p.protocol))
            if p.name:
                if p.name in names:
                    raise ValueError(f"duplicate port name {p.name!r}")
                names.add(p.name)
            elif len(self.ports) > 1:
                raise ValueError(
                    f"port {p.port} needs a name: every port of a multi-port Service is named"
                )
        if self.type == "ExternalName" and not self.external_name:
            raise ValueError("type ExternalName needs externalName")
        if self.type != "ExternalName" and self.cluster_ip != "None" and not self.ports:
            raise ValueError("a Service needs at least one port (spec.ports)")
        return self
