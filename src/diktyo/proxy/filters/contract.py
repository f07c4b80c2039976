"""The HTTP filter contract: what fault, authn/authz, header operations, stats, access log and
tracing implement, and the only way they reach a stream.

Theory of operation
-------------------
A filter is built once per snapshot (``Runtime``) and shared by every stream; per-request
state lives on the stream and is reached through ``FilterCallbacks`` methods only (no filter
reads or writes another object's fields). A stream runs the hooks of its ``FilterChain``:

- ``decode_headers(cb, head)`` - in order, before the request goes upstream. ``CONTINUE``
  passes the request to the next filter; ``STOP`` halts the chain: the filter has answered
  (``cb.send_local_reply``) or will resume it later with ``cb.continue_decoding()`` (a fault
  delay, a JWKS fetch). The chain has two stages, like Envoy's downstream filters and the
  router's: ``decode`` filters run before the destination is chosen (authn/authz, fault);
  ``route`` filters run once the route, destination and forwarded headers are known (header
  operations, tracing), once per request - never again per retry.
- ``encode_headers(cb, head)`` - on the upstream's response head before it goes downstream
  (response header operations). Encode hooks may change the head; they cannot stop (no filter
  needs to hold a response back yet).
- ``decode_data`` / ``decode_trailers`` / ``encode_data`` / ``encode_trailers`` - on body and
  trailers; the stream calls them only for filters that override them, so a chain without
  body filters costs nothing per chunk. They observe and may not stop either.
- ``on_complete(cb, flags, duration_ms)`` - once, when the stream is DONE (stats, access log,
  trace end), with Envoy's response flags string.

A filter that is not configured in a snapshot is not in its chain at all: a plain request
through a sidecar without faults, policies, header operations or tracing runs no filter hook
but the completion ones (stats, access log).
"""

from __future__ import annotations

import enum
from typing import Any, Protocol

from diktyo.proxy.codec.events import HeaderList, RequestHead, ResponseHead


class FilterStatus(enum.IntEnum):
    CONTINUE = 0
    STOP = 1


CONTINUE = FilterStatus.CONTINUE
STOP = FilterStatus.STOP


class StreamInfo(Protocol):
    """What a filter may read about a stream (Envoy's StreamInfo): request and response facts."""

    head: RequestHead  # the request as received
    out_headers: dict[str, str]  # the request headers as forwarded
    status: int  # response status (0 until one is chosen)
    req_bytes: int
    resp_bytes: int
    route: Any  # router.matcher.CompiledRoute or None
    dest: Any  # router.matcher.CompiledDestination or None
    cstate: Any  # upstream.cluster.ClusterState or None
    host: Any  # the last upstream host tried, or None
    attempt: int  # upstream attempts made (1 before any retry)
    grpc: bool  # the request is gRPC (content-type application/grpc)
    grpc_status: str  # the response's grpc-status ("" until known)
    grpc_msgs: Any  # (request, response) gRPC message counters, None unless gRPC
    peer: Any  # metric labels of the peer set by ``set_peer_labels`` (inbound), else None


class FilterCallbacks(StreamInfo, Protocol):
    """What a filter may do to a stream."""

    def route_entry(self) -> Any:
        """The matched ``CompiledRoute`` (matched on first use), None when nothing matches."""
        ...

    def routing_authority(self) -> str:
        """The authority the request is routed by."""
        ...

    def downstream_address(self) -> str: ...
    def downstream_tls_peer(self) -> tuple[str, bytes | None]:
        """``(SPIFFE id, DER certificate)`` of the client's mTLS certificate, ``("", None)``."""
        ...

    def service_port(self) -> int: ...
    def send_local_reply(
        self, status: int, body: bytes, flag: str, headers: HeaderList | None = None
    ) -> None: ...
    def continue_decoding(self) -> None:
        """Resume the decoder chain after the filter that returned ``STOP``."""
        ...

    def active(self) -> bool:
        """True while the stream still waits for its decoder chain (not answered, not gone)."""
        ...

    def add_flag(self, flag: str) -> None: ...
    def set_upstream_path(self, path: str) -> None: ...
    def set_upstream_cluster(self, name: str) -> None:
        """The cluster the request is for, before any attempt (telemetry of a local reply)."""
        ...

    def set_peer_labels(self, labels: Any) -> None:
        """Metric labels of the peer workload (inbound: from mTLS / peer metadata)."""
        ...

    def peer_labels(self) -> Any: ...
    def lb_cookie(self) -> tuple[str, str, float] | None:
        """A consistent-hash cookie the load balancer wants set on the response."""
        ...

    def set_state(self, key: str, value: Any) -> None:
        """Per-stream state of a filter (a span, a verdict)."""
        ...

    def get_state(self, key: str) -> Any: ...


class HttpFilter:
    """Base class: every hook continues and changes nothing."""

    def decode_headers(self, cb: FilterCallbacks, head: RequestHead) -> FilterStatus:
        return CONTINUE

    def decode_data(self, cb: FilterCallbacks, data: bytes, end_stream: bool) -> FilterStatus:
        return CONTINUE

    def decode_trailers(self, cb: FilterCallbacks, trailers: HeaderList) -> FilterStatus:
        return CONTINUE

    def encode_headers(self, cb: FilterCallbacks, head: ResponseHead) -> FilterStatus:
        return CONTINUE

    def encode_data(self, cb: FilterCallbacks, data: bytes, end_stream: bool) -> FilterStatus:
        return CONTINUE

    def encode_trailers(self, cb: FilterCallbacks, trailers: HeaderList) -> FilterStatus:
        return CONTINUE

    def on_complete(self, cb: FilterCallbacks, flags: str, duration_ms: float) -> None:
        return None


def _overrides(f: HttpFilter, hook: str) -> bool:
    return getattr(type(f), hook) is not getattr(HttpFilter, hook)


class FilterChain:
    """The filters of one listener direction in one snapshot, split by hook (a stream walks
    only the filters that implement a hook)."""

    __slots__ = ("complete", "decode", "decode_body", "encode", "encode_body", "route")

    def __init__(
        self, decode: list[HttpFilter], route: list[HttpFilter], other: list[HttpFilter]
    ) -> None:
        every = [*decode, *route, *other]
        self.decode = tuple(f for f in decode if _overrides(f, "decode_headers"))
        self.route = tuple(f for f in route if _overrides(f, "decode_headers"))
        self.encode = tuple(f for f in every if _overrides(f, "encode_headers"))
        self.decode_body = tuple(
            f for f in every if _overrides(f, "decode_data") or _overrides(f, "decode_trailers")
        )
        self.encode_body = tuple(
            f for f in every if _overrides(f, "encode_data") or _overrides(f, "encode_trailers")
        )
        # completion: the ``other`` filters (stats, access log) first, then the rest (a span
        # ends last, as before the filter chain existed)
        self.complete = tuple(f for f in [*other, *decode, *route] if _overrides(f, "on_complete"))
