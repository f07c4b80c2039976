"""What the HTTP connection manager needs from the sidecar that hosts it, as Protocols.

``connection_manager`` reads per-listener settings and the compiled runtime of the current
snapshot; ``proxy.sidecar`` owns the concrete ``ListenerContext`` and ``Runtime`` classes and
builds the connections. Typing the connection manager against these Protocols (instead of
importing ``proxy.sidecar``) keeps the dependency one way: sidecar -> connection manager.
The type checker proves that the sidecar's classes satisfy them where it creates
``HttpConnection(ctx)``.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Any, Protocol

from diktyo.proxy.codec.events import ServerCodec
from diktyo.proxy.filters.contract import FilterChain
from diktyo.proxy.network.pool import ConnectionPool
from diktyo.proxy.router.matcher import RouteMatcher
from diktyo.proxy.stats import Stats
from diktyo.proxy.upstream.cluster import ClusterState


class RequestIdSource(Protocol):
    """``x-request-id`` generator (``connection_manager.RequestIds``): prefix + counter."""

    prefix: str
    n: int

    def next(self) -> str: ...


class Runtime(Protocol):
    """Everything compiled from one snapshot (``proxy.sidecar.Runtime``)."""

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...
    @property
    def rng(self) -> random.Random: ...
    @property
    def stats(self) -> Stats: ...
    @property
    def request_ids(self) -> RequestIdSource: ...
    @property
    def record(self) -> Callable[..., Any]: ...
    @property
    def pools(self) -> dict[str, ConnectionPool]: ...
    @property
    def clusters(self) -> dict[str, ClusterState]: ...
    @property
    def matchers(self) -> dict[str, RouteMatcher]: ...
    @property
    def inbound_service(self) -> str: ...
    @property
    def access_log(self) -> Callable[..., None] | None: ...
    @property
    def peers(self) -> dict[tuple[Any, ...], Any]: ...
    @property
    def peer_header(self) -> str | None: ...
    @property
    def inbound_guard(self) -> Any: ...  # proxy.filters.inbound.InboundGuard, or None
    @property
    def gateway_guard(self) -> Any: ...  # the same, at gateways selected by a policy, or None
    @property
    def tracer(self) -> Any: ...  # proxy.http.tracer, or None without a collector
    @property
    def filter_chains(self) -> dict[str, FilterChain]: ...
    @property
    def sidecar(self) -> Any: ...  # the hosting sidecar (spawns background checks)

    def labels_for(
        self, reporter: str, cstate: Any, host: Any, protocol: str = "http"
    ) -> Any: ...


class SidecarHost(Protocol):
    """The sidecar as a connection sees it: the runtime of the snapshot being served."""

    @property
    def rt(self) -> Runtime | None: ...
    @property
    def accept_http_10(self) -> bool: ...


class ListenerContext(Protocol):
    """Per-listener settings read by connections (``proxy.sidecar.ListenerContext``)."""

    @property
    def sidecar(self) -> SidecarHost: ...
    @property
    def stats(self) -> Stats: ...
    @property
    def connections(self) -> set[Any]: ...
    @property
    def direction(self) -> str: ...
    @property
    def reporter(self) -> str: ...
    @property
    def route_table(self) -> str: ...
    @property
    def cluster(self) -> str: ...

    default_host: str

    @property
    def service_port(self) -> int: ...


class DownstreamConnection(Protocol):
    """What a ``DownstreamStream`` needs from the downstream connection it belongs to: its
    codec (``events.ServerCodec``) for everything on the wire, plus the connection-level
    acts - write out, reset one stream, pause reading, report the stream done. The HTTP/1.1
    ``HttpConnection`` implements it; an HTTP/2 connection implements it too (``reset_stream``
    then sends RST_STREAM instead of closing the connection)."""

    ctx: ListenerContext
    peer: str  # the client's address
    closed: bool
    paused: int  # bit mask of PAUSE_* reasons
    write_paused: bool

    @property
    def codec(self) -> ServerCodec: ...
    @property
    def transport(self) -> Any: ...
    @property
    def close_after(self) -> bool: ...
    @close_after.setter
    def close_after(self, value: bool) -> None: ...

    def flush(self) -> None: ...
    def send_continue(self, sid: int) -> None: ...
    def reset_stream(self, sid: int) -> None: ...
    def tls_peer(self) -> tuple[str, bytes | None]: ...
    def pause(self, reason: int) -> None: ...
    def resume(self, reason: int) -> None: ...
    def internal_error(self, s: Any) -> None: ...
    def stream_done(self, s: Any) -> None: ...
