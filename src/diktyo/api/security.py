"""Istio's security.istio.io schemas: PeerAuthentication, AuthorizationPolicy, RequestAuthentication."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from diktyo.api.base import IstioModel, LabelSelector, PolicyTargetReference
from diktyo.api.duration import Duration

_MTLS_MODE = Literal["UNSET", "DISABLE", "PERMISSIVE", "STRICT"]


class MutualTLS(IstioModel):
    mode: _MTLS_MODE | None = None


class PeerAuthentication(IstioModel):
    selector: LabelSelector | None = None
    mtls: MutualTLS | None = None
    port_level_mtls: dict[str, MutualTLS] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _rules(self) -> PeerAuthentication:
        if "port_level_mtls" in self.model_fields_set:
            if not self.port_level_mtls:
                raise ValueError("portLevelMtls must not be empty")
            if self.selector is None or not self.selector.match_labels:
                raise ValueError("portLevelMtls requires selector")
            for key in self.port_level_mtls:
                if not key.isdigit() or not 0 < int(key) <= 65535:
                    raise ValueError(f"portLevelMtls key {key!r}: port must be between 1-65535")
        return self


class Source(IstioModel):
    principals: list[str] = Field(default_factory=list)
    not_principals: list[str] = Field(default_factory=list)
    request_principals: list[str] = Field(default_factory=list)
    not_request_principals: list[str] = Field(default_factory=list)
    namespaces: list[str] = Field(default_factory=list)
    not_namespaces: list[str] = Field(default_factory=list)
    service_accounts: list[str] = Field(default_factory=list)
    not_service_accounts: list[str] = Field(default_factory=list)
    trust_domains: list[str] = Field(default_factory=list)
    not_trust_domains: list[str] = Field(default_factory=list)
    ip_blocks: list[str] = Field(default_factory=list)
    not_ip_blocks: list[str] = Field(default_factory=list)
    remote_ip_blocks: list[str] = Field(default_factory=list)
    not_remote_ip_blocks: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _service_accounts(self) -> Source:
        fields = self.model_fields_set
        if fields & {"service_accounts", "not_service_accounts"} and fields & {
            "principals",
            "not_principals",
            "namespaces",
            "not_namespaces",
        }:
            raise ValueError("Cannot set serviceAccounts with namespaces or principals")
        return self


class Operation(IstioModel):
    hosts: list[str] = Field(default_factory=list)
    not_hosts: list[str] = Field(default_factory=list)
    ports: list[str] = Field(default_factory=list)
    not_ports: list[str] = Field(default_factory=list)
    methods: list[str] = Field(default_factory=list)
    not_methods: list[str] = Field(default_factory=list)
    paths: list[str] = Field(default_factory=list)
    not_paths: list[str] = Field(default_factory=list)


class RuleFrom(IstioModel):
    source: Source | None = None


class RuleTo(IstioModel):
    operation: Operation | None = None


class Condition(IstioModel):
    key: str
    values: list[str] = Field(default_factory=list)
    not_values: list[str] = Field(default_factory=list)


class Rule(IstioModel):
    from_: list[RuleFrom] = Field(default_factory=list, alias="from")
    to: list[RuleTo] = Field(default_factory=list)
    when: list[Condition] = Field(default_factory=list)


class ExtensionProvider(IstioModel):
    name: str | None = None


class AuthorizationPolicy(IstioModel):
    selector: LabelSelector | None = None
    target_ref: PolicyTargetReference | None = None
    target_refs: list[PolicyTargetReference] = Field(default_factory=list)
    rules: list[Rule] = Field(default_factory=list)
    action: Literal["ALLOW", "DENY", "AUDIT", "CUSTOM"] | None = None
    provider: ExtensionProvider | None = None

    @model_validator(mode="after")
    def _one_target(self) -> AuthorizationPolicy:
        _one_target(self.model_fields_set)
        return self


class JWTHeader(IstioModel):
    name: str
    prefix: str | None = None


class ClaimToHeader(IstioModel):
    header: str
    claim: str

    @model_validator(mode="after")
    def _header(self) -> ClaimToHeader:
        if not re.match(r"^[-_A-Za-z0-9]+$", self.header):
            raise ValueError(f"header {self.header!r} must match ^[-_A-Za-z0-9]+$")
        if not self.claim:
            raise ValueError("claim must not be empty")
        return self


class JWTRule(IstioModel):
    issuer: str | None = None
    audiences: list[str] = Field(default_factory=list)
    jwks_uri: str | None = None
    jwks_uri_legacy: str | None = Field(default=None, alias="jwks_uri")
    jwks: str | None = None
    from_headers: list[JWTHeader] = Field(default_factory=list)
    from_params: list[str] = Field(default_factory=list)
    from_cookies: list[str] = Field(default_factory=list)
    output_payload_to_header: str | None = None
    forward_original_token: bool | None = None
    output_claim_to_headers: list[ClaimToHeader] = Field(default_factory=list)
    timeout: Duration | None = None
    space_delimited_claims: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _rules(self) -> JWTRule:
        fields = self.model_fields_set
        if len(fields & {"jwks_uri", "jwks_uri_legacy", "jwks"}) > 1:
            raise ValueError("only one of jwks or jwksUri can be set")
        for uri in (self.jwks_uri, self.jwks_uri_legacy):
            if uri is not None and not uri.startswith(("http://", "https://")):
                raise ValueError(f"jwksUri {uri!r}: url must have scheme http:// or https://")
        if "issuer" in fields and not self.issuer:
            raise ValueError("issuer must not be empty")
        return self


class RequestAuthentication(IstioModel):
    selector: LabelSelector | None = None
    target_ref: PolicyTargetReference | None = None
    target_refs: list[PolicyTargetReference] = Field(default_factory=list)
    jwt_rules: list[JWTRule] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_target(self) -> RequestAuthentication:
        _one_target(self.model_fields_set)
        return self


def _one_target(fields: set[str]) -> None:
    if len(fields & {"selector", "target_ref", "target_refs"}) > 1:
        raise ValueError("only one of targetRefs or selector can be set")
