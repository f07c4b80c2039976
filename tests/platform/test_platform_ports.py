"""The host-port check: TIME_WAIT leftovers of a stopped mesh are free, a live listener is not."""

from __future__ import annotations

import socket
import time

from diktyo.platform.ports import port_in_use


def _time_wait_port() -> int:
    """A port whose only trace is a TIME_WAIT connection (the server side closed first)."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    conn, _ = listener.accept()
    conn.close()  # active close on the server side: (127.0.0.1:port, client) enters TIME_WAIT
    deadline = time.monotonic() + 5
    while client.recv(1) and time.monotonic() < deadline:
        pass
    client.close()
    listener.close()
    return port


def _in_time_wait(port: int) -> bool:
    hexport = f"{port:04X}"
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[1].endswith(":" + hexport) and fields[3] == "06":  # 06 = TIME_WAIT
                return True
    return False


def test_a_port_with_only_time_wait_connections_is_free() -> None:
    port = _time_wait_port()
    assert _in_time_wait(port), "the test needs a TIME_WAIT socket on the port"
    assert not port_in_use(port)
    # and what the check promises holds: a new listener can take it
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()


def test_a_port_with_a_listener_is_in_use() -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert port_in_use(port)
    port = _time_wait_port()
    with socket.socket() as s:  # a TIME_WAIT leftover and a new listener: in use
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()
        assert port_in_use(port)
