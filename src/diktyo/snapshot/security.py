"""Security part of the snapshot: peer authentication, authorization policies and JWT rules.

The control plane resolves Istio's PeerAuthentication / AuthorizationPolicy /
RequestAuthentication for one workload (``diktyo.security.translate.build_security``); the
sidecar runs on these structs only. Field names follow Istio's, in snake_case.

- ``PeerAuthn``: the effective mTLS mode of the inbound side, already merged from mesh,
  namespace and workload scope; ``port_modes`` holds ``portLevelMtls`` keyed by the workload
  (container/app) port.
- ``AuthzPolicy``: one AuthorizationPolicy that selects this workload. A rule matches when any
  ``sources`` matches (or there are none), any ``operations`` matches (or none) and every
  ``conditions`` holds. Principals are stored as Istio writes them
  (``cluster.local/ns/default/sa/x``, no ``spiffe://``).
- ``JwtRule``: one ``jwtRules`` entry of a RequestAuthentication.
"""

from __future__ import annotations

from typing import Literal

from diktyo.snapshot.base import CanonicalStruct, SnapshotStruct


class _S(SnapshotStruct, frozen=True):
    """Same base as ``diktyo.snapshot.model._S`` (``snapshot.base``)."""


class _D(CanonicalStruct, frozen=True):
    """Same as ``diktyo.snapshot.model._D``."""


MtlsMode = Literal["PERMISSIVE", "STRICT", "DISABLE"]
PathNormalization = Literal["NONE", "BASE", "MERGE_SLASHES", "DECODE_AND_MERGE_SLASHES"]


class PeerAuthn(_D, frozen=True):
    """Effective PeerAuthentication for this workload's inbound traffic."""

    mode: MtlsMode = "PERMISSIVE"
    port_modes: dict[int, MtlsMode] = {}
    source: str = ""  # "namespace/name" of the policy that set ``mode`` ("" = Istio default)

    def mode_for(self, port: int) -> MtlsMode:
        return self.port_modes.get(port, self.mode)


class Source(_S, frozen=True):
    principals: tuple[str, ...] = ()
    not_principals: tuple[str, ...] = ()
    request_principals: tuple[str, ...] = ()
    not_request_principals: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    not_namespaces: tuple[str, ...] = ()
    service_accounts: tuple[str, ...] = ()
    not_service_accounts: tuple[str, ...] = ()
    trust_domains: tuple[str, ...] = ()
    not_trust_domains: tuple[str, ...] = ()
    ip_blocks: tuple[str, ...] = ()
    not_ip_blocks: tuple[str, ...] = ()
    remote_ip_blocks: tuple[str, ...] = ()
    not_remote_ip_blocks: tuple[str, ...] = ()


class Operation(_S, frozen=True):
    hosts: tuple[str, ...] = ()
    not_hosts: tuple[str, ...] = ()
    ports: tuple[str, ...] = ()
    not_ports: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    not_methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    not_paths: tuple[str, ...] = ()


class Condition(_S, frozen=True):
    key: str  # e.g. "request.headers[x-token]", "source.ip", "request.auth.claims[groups]"
    values: tuple[str, ...] = ()
    not_values: tuple[str, ...] = ()


class AuthzRule(_S, frozen=True):
    """One ``rules[i]``: (any ``from``) AND (any ``to``) AND (all ``when``); empty = match all."""

    sources: tuple[Source, ...] = ()  # rules[i].from[*].source
    operations: tuple[Operation, ...] = ()  # rules[i].to[*].operation
    conditions: tuple[Condition, ...] = ()  # rules[i].when


class AuthzPolicy(_D, frozen=True):
    """One AuthorizationPolicy selecting this workload. ALLOW with no rules denies everything."""

    name: str
    namespace: str = "default"
    action: Literal["ALLOW", "DENY", "AUDIT", "CUSTOM"] = "ALLOW"
    rules: tuple[AuthzRule, ...] = ()
    provider: str = ""  # CUSTOM only (not enforced by diktyo)


class JwtHeader(_S, frozen=True):
    name: str  # lower-cased
    prefix: str = ""


class ClaimToHeader(_S, frozen=True):
    header: str
    claim: str


class JwtRule(_S, frozen=True):
    """One RequestAuthentication ``jwtRules`` entry."""

    issuer: str
    audiences: tuple[str, ...] = ()
    jwks: str = ""  # inline JWKS JSON
    jwks_uri: str = ""
    from_headers: tuple[JwtHeader, ...] = ()
    from_params: tuple[str, ...] = ()
    from_cookies: tuple[str, ...] = ()
    forward_original_token: bool = False
    output_payload_to_header: str = ""
    output_claim_to_headers: tuple[ClaimToHeader, ...] = ()
    timeout: float | None = None  # jwks fetch timeout, seconds
    source: str = ""  # "namespace/name" of the RequestAuthentication


class SecurityConfig(_D, frozen=True):
    """Everything security-related a sidecar enforces on its inbound side."""

    peer_authn: PeerAuthn = PeerAuthn()
    authz: tuple[AuthzPolicy, ...] = ()
    jwt_rules: tuple[JwtRule, ...] = ()
    # meshConfig.pathNormalization; Istio's default is BASE
    path_normalization: PathNormalization = "BASE"
