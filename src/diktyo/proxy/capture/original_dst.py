"""The destination a connection had before iptables REDIRECT rewrote it (``SO_ORIGINAL_DST``).

Netfilter keeps the pre-NAT destination in conntrack; ``getsockopt(SOL_IP, SO_ORIGINAL_DST)``
(``IP6T_SO_ORIGINAL_DST`` on ``SOL_IPV6`` for IPv6) reads it back as a ``sockaddr_in`` /
``sockaddr_in6``. On a socket that was not redirected the kernel answers ``ENOENT``.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
IP6T_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv6/ip6_tables.h
_SOL_IPV6 = getattr(socket, "SOL_IPV6", 41)


def parse_sockaddr(raw: bytes) -> tuple[str, int]:
    """``(ip, port)`` from a raw ``sockaddr_in`` (16 bytes) or ``sockaddr_in6`` (28 bytes)."""
    if len(raw) < 8:
        raise ValueError(f"sockaddr too short ({len(raw)} bytes)")
    family = struct.unpack_from("=H", raw, 0)[0]
    port = struct.unpack_from("!H", raw, 2)[0]
    if family == socket.AF_INET:
        return str(ipaddress.IPv4Address(raw[4:8])), port
    if family == socket.AF_INET6 and len(raw) >= 24:
        return str(ipaddress.IPv6Address(raw[8:24])), port
    raise ValueError(f"unexpected address family {family} in sockaddr")


def original_dst(sock: socket.socket) -> tuple[str, int]:
    """The original destination of a redirected TCP connection; raises OSError if it has none."""
    if sock.family == socket.AF_INET6:
        try:
            raw = sock.getsockopt(_SOL_IPV6, IP6T_SO_ORIGINAL_DST, 28)
            return parse_sockaddr(raw)
        except OSError:
            pass  # an IPv4 connection accepted on a dual-stack socket: ask the IPv4 table
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    return parse_sockaddr(raw)
