"""Listener sockets: bind synchronously (so a snapshot can be rejected before it is applied), then serve.

TLS seam: ``serve(..., ssl=ctx)`` terminates TLS on a listener; the mTLS work passes the server
``SSLContext`` here and nowhere else.
"""

from __future__ import annotations

import asyncio
import socket
import ssl as _ssl
from collections.abc import Callable


def bind_listener(address: str, port: int, backlog: int = 1024) -> socket.socket:
    """A listening, non-blocking socket on ``address:port`` (0 = any free port); raises OSError."""
    sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
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
