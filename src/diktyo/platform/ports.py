"""Free local ports for sidecars and apps.

A port handed out here is bound later by another process (a sidecar, an app), seconds later on a
loaded machine. A port the kernel picks for ``bind(port 0)`` comes from its ephemeral range
(``net.ipv4.ip_local_port_range``, 32768-60999 by default), the range every other ``bind(0)`` and
every outgoing connection on the machine also takes ports from: one of them can take the port in
between, and the sidecar then fails to listen ("address already in use"). So ``free_port()``
picks at random from a range *below* the ephemeral one, where the kernel never hands out ports
by itself: ``$DIKTYO_PORT_RANGE`` (``LOW-HIGH``), by default 20000 up to the ephemeral range's
start. A pick is checked free by binding it, and one process does not hand out a port again
while it is among its recent picks (bound or not yet). Without a usable range (an ephemeral
range starting below 21000) the kernel picks, as before.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections import deque
from pathlib import Path

RANGE_ENV = "DIKTYO_PORT_RANGE"
DEFAULT_LOW = 20000
_EPHEMERAL = Path("/proc/sys/net/ipv4/ip_local_port_range")
_RECENT = 256  # picks remembered per process (a port picked longer ago is bound by now)
_TRIES = 100

_recent: deque[int] = deque(maxlen=_RECENT)


def parse_range(text: str) -> tuple[int, int]:
    """``"LOW-HIGH"`` -> ``(LOW, HIGH)``; ``ValueError`` naming ``$DIKTYO_PORT_RANGE`` if bad."""
    low, sep, high = text.partition("-")
    try:
        lo, hi = int(low), int(high)
    except ValueError:
        lo = hi = -1
    if not sep or not 1024 <= lo <= hi <= 65535:
        raise ValueError(
            f"{RANGE_ENV}={text!r}: expected LOW-HIGH with 1024 <= LOW <= HIGH <= 65535, "
            "e.g. 20000-29999 (keep it below net.ipv4.ip_local_port_range)"
        )
    return lo, hi


def port_range() -> tuple[int, int] | None:
    """The range ``free_port()`` picks from, or None to let the kernel pick."""
    text = os.environ.get(RANGE_ENV, "").strip()
    if text:
        return parse_range(text)
    try:
        ephemeral_low = int(_EPHEMERAL.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    if ephemeral_low - DEFAULT_LOW < 1000:
        return None
    return DEFAULT_LOW, ephemeral_low - 1


def _bindable(host: str, port: int) -> bool:
    # no SO_REUSEADDR: a port with TIME_WAIT leftovers is skipped too (not every app sets it)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    rng = port_range()
    if rng is not None:
        lo, hi = rng
        for _ in range(_TRIES):
            port = lo + secrets.randbelow(hi - lo + 1)
            if port not in _recent and _bindable(host, port):
                _recent.append(port)
                return port
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
