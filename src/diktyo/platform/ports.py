"""Free local ports for sidecars and apps (bind port 0, read it, close)."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """True when a listener holds ``port``.

    The probe binds with ``SO_REUSEADDR``, as the sidecars' own listeners do (asyncio's
    ``create_server`` sets it): connections of a mesh stopped a moment ago linger in TIME_WAIT
    for up to a minute, and they must not make the port look taken. A socket that listens on
    the port still makes the bind fail on Linux, so a real listener is still reported.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
        return False
