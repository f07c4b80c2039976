"""Listener sockets: bind synchronously (so a snapshot can be rejected before it is applied), then serve.

``serve(..., ssl=ctx)`` terminates TLS on a listener; ``serve_inbound`` is the inbound
listener with PeerAuthentication (mTLS and/or plaintext on one port, ``tls.accept_inbound``).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl as _ssl
from collections.abc import Callable

log = logging.getLogger("diktyo.proxy")


def bind_listener(
    address: str, port: int, backlog: int = 1024, reuse_port: bool = False
) -> socket.socket:
    """A listening, non-blocking socket on ``address:port`` (0 = any free port); raises OSError.
    ``reuse_port``: SO_REUSEPORT, for one socket per worker process on the same port."""
    sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((address, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


async def serve(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    factory: Callable[[], asyncio.BaseProtocol],
    ssl: _ssl.SSLContext | None = None,
) -> asyncio.AbstractServer:
    """Start accepting on an already bound socket."""
    return await loop.create_server(factory, sock=sock, backlog=1024, ssl=ssl)


class InboundServer:
    """The accept loop of an inbound listener with mTLS (PeerAuthentication).

    Every accepted socket goes through ``tls.accept_inbound``: it peeks at the first byte and,
    per ``mode()`` (read per connection, so a new snapshot applies to new connections),
    terminates mTLS, passes plaintext, or closes the connection (STRICT + plaintext).
    ``close()`` stops accepting, like ``asyncio.Server.close``.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        factory: Callable[[], asyncio.Protocol],
        mode: Callable[[], str],
        store: object,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        self.loop = loop
        self.sock = sock
        self.factory = factory
        self.mode = mode
        self.store = store
        self.on_refused = on_refused
        self.refused = 0
        self.accepted = 0
        self.last_refusal = ""
        self._handshakes: set[asyncio.Task[None]] = set()
        self._task = loop.create_task(self._accept())

    async def _accept(self) -> None:
        loop = self.loop
        while True:
            try:
                conn, _ = await loop.sock_accept(self.sock)
            except asyncio.CancelledError:
                raise
            except OSError as exc:
                if self.sock.fileno() < 0:
                    return
                log.warning("inbound accept failed: %s", exc)
                await asyncio.sleep(0.05)
                continue
            t = loop.create_task(self._handle(conn))
            self._handshakes.add(t)
            t.add_done_callback(self._handshakes.discard)

    async def _handle(self, conn: socket.socket) -> None:
        from diktyo.proxy.network.tls import InboundRefused, accept_inbound

        try:
            await accept_inbound(self.loop, conn, self.factory, self.mode(), self.store)  # type: ignore[arg-type]
        except InboundRefused as exc:
            self.refused += 1
            self.last_refusal = str(exc)
            log.info("inbound connection refused: %s", exc)
            if self.on_refused is not None:
                self.on_refused(str(exc))
            return
        except Exception:
            log.exception("inbound connection setup failed")
            conn.close()
            return
        self.accepted += 1

    def close(self) -> None:
        self._task.cancel()
        for t in list(self._handshakes):
            t.cancel()
        try:
            self.sock.close()
        except OSError:
            pass

    def is_serving(self) -> bool:
        return not self._task.done()


def serve_inbound(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    factory: Callable[[], asyncio.Protocol],
    mode: Callable[[], str],
    store: object,
    on_refused: Callable[[str], None] | None = None,
) -> InboundServer:
    """Start accepting with PeerAuthentication semantics (PERMISSIVE / STRICT / DISABLE)."""
    return InboundServer(loop, sock, factory, mode, store, on_refused)
