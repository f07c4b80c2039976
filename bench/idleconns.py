"""RSS per idle keep-alive connection (issue 11: <= 4 KB): open N client connections to a
proxy, one request each, leave them open and idle, and divide the proxy's RSS growth by N.

Two phases on the same proxy, both measured from the RSS before the first:

- ``downstream``: the N requests go one after another, so the proxy forwards them all over
  the one upstream connection it keeps; the growth is the cost of N idle *client* connections;
- ``with_upstream``: the N requests are all in flight at once, so the proxy opens up to N
  upstream connections and keeps them in its pool when the answers are back; the growth is
  the cost of N idle client connections plus the pooled upstream ones. ``upstream`` is the
  difference per connection (what one idle pooled upstream connection adds).

RSS is the proxy's whole process tree (``/proc/PID/status`` VmRSS), read after the
connections have been idle for ``settle`` seconds. Only the proxy's memory counts: the client
is this process.
"""

from __future__ import annotations

import selectors
import socket
import time
from typing import Any

from procs import Proc, status_kib

REQUEST = b"GET / HTTP/1.1\r\nHost: upstream.bench.svc.cluster.local\r\nUser-Agent: diktyo-bench-idle\r\n\r\n"


class IdleConnError(RuntimeError):
    """A connection did not get its answer; the message says which and why."""


def _rss_kib(procs: list[Proc]) -> int:
    return status_kib([pid for p in procs for pid in p.pids()], "VmRSS")


def _complete(buf: bytes) -> bool:
    """A whole response with Content-Length (the bench upstream's fixed responses)."""
    head, sep, body = buf.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value.strip())
    return True  # no length (not expected here): the head is enough


def _open(port: int, n: int, concurrent: bool, timeout: float) -> list[socket.socket]:
    """``n`` connections with one answered request each; all in flight at once if
    ``concurrent``, else one after another."""
    socks: list[socket.socket] = []
    deadline = time.monotonic() + timeout

    def connect() -> socket.socket:
        s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        socks.append(s)
        return s

    def read_answers(batch: list[socket.socket]) -> None:
        sel = selectors.DefaultSelector()
        bufs: dict[socket.socket, bytes] = {}
        for s in batch:
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ)
            bufs[s] = b""
        try:
            while bufs:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise IdleConnError(
                        f"{len(bufs)} of {len(batch)} connections got no answer within {timeout}s"
                    )
                for key, _ in sel.select(min(left, 1.0)):
                    s = key.fileobj
                    assert isinstance(s, socket.socket)
                    chunk = s.recv(65536)
                    if not chunk:
                        raise IdleConnError(f"the proxy closed a connection: {bufs[s][:200]!r}")
                    bufs[s] += chunk
                    if _complete(bufs[s]):
                        if not bufs[s].startswith(b"HTTP/1.1 200"):
                            raise IdleConnError(f"answer was not 200: {bufs[s][:200]!r}")
                        sel.unregister(s)
                        del bufs[s]
        finally:
            sel.close()

    try:
        if concurrent:
            batch = [connect() for _ in range(n)]
            for s in batch:
                s.sendall(REQUEST)
            read_answers(batch)
        else:
            for _ in range(n):
                s = connect()
                s.sendall(REQUEST)
                read_answers([s])
    except BaseException:
        _close(socks)
        raise
    return socks


def _close(socks: list[socket.socket]) -> None:
    for s in socks:
        try:
            s.close()
        except OSError:
            pass


def measure(
    port: int, procs: list[Proc], n: int = 1000, settle: float = 1.0, timeout: float = 60.0
) -> dict[str, Any]:
    """Both phases against the proxy listening on ``port``; KiB and bytes per connection."""
    out: dict[str, Any] = {"connections": n}
    time.sleep(settle)
    before = _rss_kib(procs)
    out["rss_before_kib"] = before
    for phase, concurrent in (("downstream", False), ("with_upstream", True)):
        # one baseline for both: the second phase reuses what the first freed, so measuring it
        # from the first's leftovers would undercount
        socks = _open(port, n, concurrent, timeout)
        try:
            time.sleep(settle)  # idle: timers armed, buffers released
            after = _rss_kib(procs)
        finally:
            _close(socks)
        out[phase] = {"rss_after_kib": after, "bytes_per_conn": (after - before) * 1024 / n}
        time.sleep(settle / 2)  # the proxy sees the closes before the next phase
    out["upstream_bytes_per_conn"] = (
        out["with_upstream"]["bytes_per_conn"] - out["downstream"]["bytes_per_conn"]
    )
    return out
