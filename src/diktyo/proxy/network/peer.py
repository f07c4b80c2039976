"""The mTLS peer of a downstream connection: its SPIFFE id and certificate."""

from __future__ import annotations

import asyncio

PLAIN_PEER: tuple[str, bytes | None] = ("", None)


def transport_peer(transport: asyncio.BaseTransport | None) -> tuple[str, bytes | None]:
    """``(spiffe id, DER certificate)`` of the client of an mTLS ``transport``; ``("", None)``
    without TLS, ``("", DER)`` for a certificate without a SPIFFE id. Callers cache it per
    connection (a connection's peer does not change)."""
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if ssl_object is None:
        return PLAIN_PEER
    from diktyo.proxy.network.tls import peer_facts  # mTLS only: keeps idle RSS low

    der = ssl_object.getpeercert(binary_form=True)
    sid = ""
    if der:
        try:
            sid = peer_facts(der)[0] or ""
        except ValueError:
            sid = ""
    return (sid, der or None)
