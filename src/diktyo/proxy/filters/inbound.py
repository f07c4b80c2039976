"""Per-request security of the inbound listener: mTLS peer -> path normalisation -> JWT -> RBAC.

Gateways use the same guard on their listeners (``Runtime.gateway_guard``) when an
AuthorizationPolicy or RequestAuthentication selects them (Istio's ingress policies).

``InboundGuard`` is built per snapshot (``Runtime.inbound_guard``) when the sidecar has a
workload certificate or the snapshot carries AuthorizationPolicies / RequestAuthentications.
It is a filter (``filters.contract``); ``decode_headers`` runs before the request is forwarded:

- the peer's SPIFFE id and certificate come from the connection's TLS session (cached per
  connection); ``x-forwarded-client-cert`` is replaced by ``By=<us>;Hash=<sha256>;URI=<peer>``;
- ``InboundSecurity`` decides: 400 (bad path), 401 (JWT), 403 ``RBAC: access denied``;
  allowed requests are forwarded with the normalised path;
- telemetry (reporter=destination): ``source_principal`` / ``destination_principal`` and
  ``connection_security_policy="mutual_tls"`` for mTLS connections; the source workload labels
  come from the ``x-diktyo-peer-metadata`` header the client sidecar sends (removed before the
  app sees it), else only the namespace from the peer's SPIFFE id.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from diktyo.proxy.codec.events import RequestHead
from diktyo.proxy.filters.authz import InboundSecurity, InboundVerdict
from diktyo.proxy.filters.contract import (
    CONTINUE,
    STOP,
    FilterCallbacks,
    FilterStatus,
    HttpFilter,
)
from diktyo.proxy.network.peer import transport_peer
from diktyo.snapshot.security import SecurityConfig
from diktyo.telemetry.istio_metrics import PEER_METADATA_HEADER, PeerLabels, WorkloadInfo

log = logging.getLogger("diktyo.proxy")

# response status of a refused request -> the sidecar counter it increments (envoy_http_<name>)
_DENIED_COUNTERS = {403: "rbac_denied", 401: "jwt_authn_denied", 400: "path_rejected"}

MAX_PEER_LABEL_SETS = 4096  # the metadata header is client-controlled: bound the cache
def connection_peer(conn: Any) -> tuple[str, bytes | None]:
    """``(spiffe id, DER certificate)`` of an inbound connection's mTLS peer, ``("", None)``
    without; cached on the connection."""
    peer: tuple[str, bytes | None] | None = getattr(conn, "mtls_peer", None)
    if peer is None:
        peer = conn.mtls_peer = transport_peer(conn.transport)
    return peer


class InboundGuard(HttpFilter):
    """The inbound security of one runtime (snapshot), as the first filter of the chain:
    mTLS peer -> path normalisation -> JWT -> RBAC (one filter, as RBAC reads the JWT
    verdict's claims)."""

    __slots__ = ("rt", "security", "service", "telemetry")

    def __init__(
        self,
        rt: Any,
        config: SecurityConfig,
        local_spiffe_id: str,
        fetcher: Any = None,
        telemetry: bool = True,
    ) -> None:
        self.rt = rt
        self.security = InboundSecurity(
            config, local_spiffe_id=local_spiffe_id, fetcher=fetcher, clock=rt.clock
        )
        self.service = rt.inbound_service
        # False on gateways: they report as source, the peer labels are for destinations
        self.telemetry = telemetry

    def labels(
        self, principal: str, meta: str | None, cstate: Any, protocol: str = "http"
    ) -> Any:
        """Destination-reporter metric labels for a request from ``principal`` / peer metadata
        (``protocol``: Istio's ``request_protocol``, ``grpc`` for gRPC requests)."""
        rt = self.rt
        key = ("inbound-peer", principal, meta, protocol)
        p = rt.peers.get(key)
        if p is not None:
            return p
        src = WorkloadInfo.decode(meta) if meta else None
        if src is None:
            src = WorkloadInfo.from_principal(principal) if principal else None
        elif principal:
            src = dataclasses.replace(src, principal=principal)  # the certificate is the truth
        service = self.service or (cstate.cluster.service if cstate is not None else "")
        labels = PeerLabels.build(
            "destination", src, rt.me, service, protocol=protocol, mtls=bool(principal)
        )
        p = rt.stats.metrics.peer(labels)
        if len(rt.peers) < MAX_PEER_LABEL_SETS:
            rt.peers[key] = p
        return p

    def decode_headers(self, cb: FilterCallbacks, head: RequestHead) -> FilterStatus:
        """CONTINUE: forward the request; STOP: answered here, or continues once a remote
        JWKS is fetched."""
        principal, der = cb.downstream_tls_peer()
        h = head.headers
        meta = h.pop(PEER_METADATA_HEADER, None)
        if self.telemetry and (principal or meta):
            ct = h.get("content-type")
            proto = "grpc" if ct is not None and ct.startswith("application/grpc") else "http"
            cb.set_peer_labels(self.labels(principal, meta, cb.cstate, proto))
        verdict = self.security.check(
            head.method, head.path, head.authority, h, cb.service_port() or 0,
            principal, cb.downstream_address(), der,
        )  # fmt: skip
        if verdict is None:  # a remote JWKS is not fetched yet
            self.rt.sidecar.spawn(self._later(cb, head, principal, der))
            return STOP
        return self._apply(cb, head, verdict, principal)

    def _apply(
        self, cb: FilterCallbacks, head: RequestHead, verdict: InboundVerdict, principal: str
    ) -> FilterStatus:
        if verdict.status:
            flag = "RBAC" if verdict.status == 403 else ""
            # a counter per refusal kind (Envoy's rbac.denied / jwt_authn.denied) and the reason
            counter = _DENIED_COUNTERS.get(verdict.status, "security_denied")
            server = self.rt.stats.server
            server[counter] = server.get(counter, 0) + 1
            log.info(
                "inbound %s %s from %s refused %d: %s",
                head.method, head.path[:200], principal or cb.downstream_address() or "unknown",
                verdict.status, verdict.details or verdict.body[:120].decode(errors="replace"),
            )  # fmt: skip
            cb.send_local_reply(verdict.status, verdict.body, flag)
            return STOP
        h = head.headers
        for k in verdict.remove_headers:
            h.pop(k, None)
        for k, v in verdict.set_headers:
            h[k] = v
        cb.set_upstream_path(verdict.path)
        return CONTINUE

    async def _later(
        self, cb: FilterCallbacks, head: RequestHead, principal: str, der: bytes | None
    ) -> None:
        try:
            verdict = await self.security.check_async(
                head.method, head.path, head.authority, head.headers,
                cb.service_port() or 0, principal, cb.downstream_address(), der,
            )  # fmt: skip
        except Exception:
            log.exception("inbound security check failed")
            verdict = InboundVerdict(500, b"internal proxy error", "security_check_failed")
        if not cb.active():
            return
        if self._apply(cb, head, verdict, principal) is CONTINUE:
            cb.continue_decoding()
