"""Mesh mTLS: SSL contexts from in-memory PEM, SPIFFE peer checks, rotation, and XFCC.

Sidecar-to-sidecar traffic uses TLS 1.3 with ECDSA P-256 certificates from the diktyo CA.
Python's hostname check does not know URI SANs, so contexts are built with
``check_hostname=False`` and the caller checks the peer's SPIFFE id after the handshake with
``verify_peer`` (the chain itself is verified by OpenSSL against the trust bundle).

``CertificateStore`` holds the current certificate, key and trust bundle; it builds a fresh
context per version, so a rotation affects only new connections (existing ones keep theirs).

Session resumption (TLS 1.3 tickets): client contexts are ``ResumingClientContext``s, each with
its own ``SessionCache`` keyed per upstream (address, port, SNI, expected identity). The
server sends its tickets after the handshake, so the cache keeps the newest connection's
``SSLObject`` and takes its session lazily; one session is then offered to every new
connection to that upstream for up to a second (the inbound listener's stateful tickets can
be used more than once), since taking a session out of CPython's ``SSLObject`` is slow
(~0.2-0.35 ms measured) and putting one in copies it (~0.27 ms; see ``_offer_native``).
Tickets are encrypted with keys of the server's ``SSL_CTX``, which lives until the next
certificate or trust-bundle rotation; a rotation on either side therefore means a full
handshake (the client's new context starts with an empty cache, the server's new context
cannot decrypt old tickets). A resumed session carries the peer certificate of the full
handshake it came from, so the peer's SPIFFE id (authz, XFCC, metrics) is the same as on a
full handshake; ``resumed_peer_problem`` refuses one whose certificate has expired since.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import socket
import ssl
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, cast

from cryptography import x509

from diktyo.security.certs import fingerprint, load_certs, spiffe_id_of
from diktyo.security.spiffe import to_principal
from diktyo.snapshot.model import TlsSettings

# Istio's sidecars offer these; diktyo speaks HTTP/1.1 inside the tunnel.
MESH_ALPN = ("istio-http/1.1", "istio", "http/1.1")
# what inbound listeners accept: HTTP/2 first when the client offers it (the server's order wins)
INBOUND_ALPN = ("istio-h2", "h2", *MESH_ALPN)


class TlsConfigError(ValueError):
    """Certificates or keys that cannot be loaded into an SSL context."""


def _load_chain(ctx: ssl.SSLContext, cert_chain_pem: str, key_pem: str) -> None:
    """``load_cert_chain`` wants paths: hand it an anonymous memory file, never the disk."""
    data = (key_pem.strip() + "\n" + cert_chain_pem.strip() + "\n").encode()
    fd = -1
    path = ""
    try:
        if hasattr(os, "memfd_create"):
            fd = os.memfd_create("diktyo-tls", 0)
            os.write(fd, data)
            path = f"/proc/self/fd/{fd}"
        else:  # pragma: no cover - non-Linux
            fd, path = tempfile.mkstemp(prefix="diktyo-tls-")
            os.write(fd, data)
        ctx.load_cert_chain(path)
    except ssl.SSLError as exc:
        raise TlsConfigError(
            f"cannot load certificate chain and key: {exc.reason or exc}"
        ) from None
    finally:
        if fd >= 0:
            os.close(fd)
        if path and not path.startswith("/proc/"):  # pragma: no cover
            os.unlink(path)


# ---------------------------------------------------------------------- record reads

# the largest plaintext one TLS record carries (RFC 8446 5.1: 2^14 bytes); OpenSSL's SSL_read
# returns at most one record's data per call
TLS_MAX_PLAINTEXT = 16384


class RecordSizedSSLObject(ssl.SSLObject):
    """An ``SSLObject`` whose ``read(n)`` without a buffer asks OpenSSL for at most one
    record's plaintext.

    uvloop's (and the stdlib's) SSL protocol reads decrypted data with ``read(256 KiB)`` in a
    loop while bytes are pending. CPython allocates the full ``n`` bytes first and shrinks the
    object to what was read: 256 KiB is above glibc's mmap threshold, so every read of a small
    request or response was an ``mmap`` + ``mremap`` + ``munmap`` and fresh pages (strace:
    three syscalls per TLS read). Capped at one record the buffer comes from the heap; the
    protocol's loop still drains everything, one record per call. Nothing about the TLS itself
    changes (same records, versions, verification)."""

    def read(self, len: int = 1024, buffer: Any = None) -> Any:
        sslobj = self._sslobj  # type: ignore[attr-defined]  # the private _ssl object
        if buffer is not None:
            return sslobj.read(len, buffer)
        return sslobj.read(len if len <= TLS_MAX_PLAINTEXT else TLS_MAX_PLAINTEXT)


# ---------------------------------------------------------------------- session resumption

# the session ``open_upstream`` offers for the connection it is opening, read by
# ``ResumingClientContext.wrap_bio``: ``tlsrecord.new_tls`` calls it in the caller's task (as
# asyncio's and uvloop's SSL protocols do, whose ``create_connection`` has no ``session``)
_OFFER: contextvars.ContextVar[ssl.SSLSession | None] = contextvars.ContextVar(
    "diktyo_tls_offer", default=None
)


def _resumable(obj: ssl.SSLObject) -> ssl.SSLSession | None:
    """The session of a finished connection if a new one can resume it, else None."""
    try:
        sess = obj.session
    except (AttributeError, ValueError, ssl.SSLError):
        return None
    if sess is None or sess.time + sess.timeout <= time.time():
        return None
    if sess.has_ticket:
        return sess
    try:
        tls13 = obj.version() == "TLSv1.3"
    except (AttributeError, ValueError):
        return None
    return sess if not tls13 and sess.id else None  # TLS 1.2 session-id resumption


# how long one session is offered before the newest connection's ticket replaces it: taking a
# session out of an ``SSLObject`` costs ~0.2-0.35 ms in CPython 3.11 (measured), so it is
# done once per upstream and interval instead of per connection. Short, so that the session
# stays among the newest of the server's capped session cache (``SERVER_SESSION_CACHE``). diktyo's inbound listeners issue stateful tickets, which OpenSSL keeps in the
# server context's cache and accepts any number of times (it removes one on use only when
# early data with anti-replay is on, which diktyo never enables).
SESSION_REFRESH_SECONDS = 1.0
# a session this close to its end is no longer offered (it could expire during the handshake)
SESSION_EXPIRY_MARGIN = 5.0


class SessionCache:
    """One resumable session per upstream key, for one client context, offered to many
    connections.

    ``remember(key, ssl_object)`` after each handshake; ``offer(key)`` before the next
    connection. TLS 1.3 tickets arrive after the handshake, so the newest connection's
    ``SSLObject`` is kept and its session taken lazily, at most once per ``refresh_after``
    seconds (or half the session's remaining lifetime, if shorter); the current session stays
    in use until then. A connection that offered the current session and was not resumed
    (the server lost it: restart, rotation, cache eviction) drops it, so the next connection
    takes that connection's new ticket. At most ``max_entries`` upstreams are kept (least
    recently used dropped).
    """

    __slots__ = ("_entries", "max_entries", "refresh_after")

    def __init__(
        self, max_entries: int = 1024, refresh_after: float = SESSION_REFRESH_SECONDS
    ) -> None:
        # key -> [session, newest SSLObject, refresh at (monotonic), offer until (wall clock),
        #         the SSLObject the session came from]
        self._entries: OrderedDict[Hashable, list[Any]] = OrderedDict()
        self.max_entries = max_entries
        self.refresh_after = refresh_after

    def __len__(self) -> int:
        return len(self._entries)

    def offer(self, key: Hashable) -> ssl.SSLSession | None:
        e = self._entries.get(key)
        if e is None:
            return None
        sess: ssl.SSLSession | None = e[0]
        latest = e[1]
        if sess is not None and not _still_resumable(sess):
            e[0] = sess = None  # a connection offered it was freed before its new ticket
        if latest is not None and (sess is None or time.monotonic() >= e[2]):
            fresh = _resumable(latest)
            if fresh is not None and _still_resumable(fresh):
                e[0] = sess = fresh
                e[1] = None
                # the session is the connection's own SSL_SESSION (CPython's getter does not
                # copy it): OpenSSL marks it not resumable when that connection is freed
                # without a close_notify (an aborted upstream), so keep it until replaced
                e[4] = latest
                now = time.time()
                e[3] = until = fresh.time + fresh.timeout - SESSION_EXPIRY_MARGIN
                e[2] = time.monotonic() + min(self.refresh_after, max(0.0, (until - now) / 2))
        if sess is not None and e[3] <= time.time():
            e[0] = sess = None
        return sess

    def remember(self, key: Hashable, ssl_object: ssl.SSLObject) -> None:
        e = self._entries.get(key)
        if e is None:
            self._entries[key] = [None, ssl_object, 0.0, 0.0, None]
            if len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        else:
            e[1] = ssl_object
            if e[0] is not None and not ssl_object.session_reused:
                e[0] = None  # the server refused the session we offer: take the new one
            self._entries.move_to_end(key)

    def forget(self, key: Hashable) -> None:
        self._entries.pop(key, None)


# CPython's ``SSLObject`` session setter copies the session before ``SSL_set_session``
# (serialised and parsed again, peer certificate included: ~0.27 ms, as much as the resumed
# handshake itself), a workaround for an OpenSSL 1.1.0 bug (openssl/openssl#1550: a session
# whose connection was freed uncleanly is marked not resumable). Clients of OpenSSL share one
# SSL_SESSION between connections (curl, nginx); OpenSSL's TLS 1.3 client copies the session
# before changing it (new ticket), and one that became not resumable is simply not offered
# (full handshake, and ``SessionCache.remember`` then drops it). So on CPython 3.11 the
# session is handed to OpenSSL directly, through the struct layout of ``_ssl`` objects;
# checked on first use against OpenSSL's own getters, falling back to the copying setter.
# ``DIKTYO_TLS_SESSION_COPY=1`` forces the fallback.
_NATIVE: list[Any] = []  # [] = not tried yet, [None] = unavailable, [setter] otherwise


def _native_setter() -> Callable[[ssl.SSLObject, ssl.SSLSession], bool] | None:
    import sys

    if (
        sys.implementation.name != "cpython"
        or sys.version_info[:2] != (3, 11)
        or os.environ.get("DIKTYO_TLS_SESSION_COPY", "") not in ("", "0")
    ):
        return None
    try:
        import _ssl
        import ctypes

        lib = ctypes.CDLL(_ssl.__file__)  # resolves in the libssl that _ssl is linked to
        set_session = lib.SSL_set_session
        get_session = lib.SSL_get_session
        get_ctx = lib.SSL_get_SSL_CTX
        in_before = lib.SSL_in_before
        sess_time = lib.SSL_SESSION_get_time
        sess_timeout = lib.SSL_SESSION_get_timeout
        is_resumable = lib.SSL_SESSION_is_resumable
    except (ImportError, OSError, AttributeError):
        return None
    vp = ctypes.c_void_p
    set_session.argtypes, set_session.restype = [vp, vp], ctypes.c_int
    get_session.argtypes, get_session.restype = [vp], vp
    get_ctx.argtypes, get_ctx.restype = [vp], vp
    in_before.argtypes, in_before.restype = [vp], ctypes.c_int
    sess_time.argtypes, sess_time.restype = [vp], ctypes.c_long
    sess_timeout.argtypes, sess_timeout.restype = [vp], ctypes.c_long
    is_resumable.argtypes, is_resumable.restype = [vp], ctypes.c_int
    # CPython 3.11 _ssl.c: PySSLSocket {PyObject_HEAD; PyObject *Socket; SSL *ssl; ...},
    # PySSLSession {PyObject_HEAD; SSL_SESSION *session; ...}, PySSLContext {HEAD; SSL_CTX *ctx}
    head = object.__basicsize__
    # _SSLSocket is private to _ssl and missing from typeshed
    socket_type, session_type = _ssl._SSLSocket, _ssl.SSLSession  # type: ignore[attr-defined]  # private
    ptr = ctypes.sizeof(vp)
    at = vp.from_address
    checked: list[bool] = []

    def native_set(obj: ssl.SSLObject, session: ssl.SSLSession) -> bool:
        sslobj = getattr(obj, "_sslobj", None)
        if type(sslobj) is not socket_type or type(session) is not session_type:
            return False  # only the _ssl objects whose layout is known are read raw
        ssl_p = at(id(sslobj) + head + ptr).value
        sess_p = at(id(session) + head).value
        if not checked:  # once: the layout is the one assumed, or never again
            ctx_p = at(id(obj.context) + head).value
            if not (
                ssl_p
                and sess_p
                and get_ctx(ssl_p) == ctx_p
                and in_before(ssl_p) == 1
                and sess_time(sess_p) == session.time
                and sess_timeout(sess_p) == session.timeout
            ):
                return False
        if set_session(ssl_p, sess_p) != 1:
            return False
        if not checked:
            if get_session(ssl_p) != sess_p:
                return False
            checked.append(True)
        return True

    def resumable(session: ssl.SSLSession) -> bool:
        if not checked or type(session) is not session_type:
            return True  # layout not confirmed yet, or not an _ssl session: no raw read
        return bool(is_resumable(at(id(session) + head).value))

    native_set.resumable = resumable  # type: ignore[attr-defined]  # a function attribute
    return native_set


def _still_resumable(session: ssl.SSLSession) -> bool:
    """False when OpenSSL has marked the shared ``session`` not resumable: a connection it
    was handed to without a copy was freed without close_notify before its new ticket came
    (openssl/openssl#1550). Always True when sessions are copied (the copy is resumable)."""
    setter = _NATIVE[0] if _NATIVE else None
    return setter is None or bool(setter.resumable(session))


def _offer_native(obj: ssl.SSLObject, session: ssl.SSLSession) -> bool:
    """Offer ``session`` on the not yet started ``obj`` without CPython's copy; False when
    not possible here (the caller then uses the copying setter)."""
    if not _NATIVE:
        _NATIVE.append(_native_setter())
    setter = _NATIVE[0]
    if setter is None:
        return False
    if setter(obj, session):
        return True
    _NATIVE[0] = None  # unexpected layout or refusal: copy from now on
    return False


class ResumingClientContext(ssl.SSLContext):
    """A client ``SSLContext`` that offers the session ``open_upstream`` picked from its
    ``sessions`` cache (asyncio cannot pass one). Sessions belong to the context that made
    them, so each context has its own cache and a rotated context starts empty."""

    sessions: SessionCache
    sslobject_class = RecordSizedSSLObject

    def __init__(self, protocol: int = ssl.PROTOCOL_TLS_CLIENT) -> None:
        self.sessions = SessionCache()

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        if session is None and not server_side:
            offer = _OFFER.get()
            if offer is not None:
                obj = super().wrap_bio(incoming, outgoing, False, server_hostname)
                if not _offer_native(obj, offer):
                    obj.session = offer
                return obj
        return super().wrap_bio(incoming, outgoing, server_side, server_hostname, session)


def offering(session: ssl.SSLSession | None) -> contextvars.Token[ssl.SSLSession | None]:
    """Offer ``session`` for connections opened in this task until ``_OFFER.reset(token)``."""
    return _OFFER.set(session)


def resumed_peer_problem(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str:
    """For a resumed session: why its peer certificate (from the original full handshake)
    is no longer good enough, or ""; full handshakes were checked by OpenSSL."""
    if ssl_object is None or not ssl_object.session_reused:
        return ""
    der = peer_certificate_der(ssl_object)
    if not der:
        return ""  # no certificate: the caller's identity check refuses it
    try:
        not_after = peer_facts(der)[1]
    except ValueError as exc:
        return f"peer certificate of the resumed session cannot be parsed: {exc}"
    if not_after <= time.time():
        return "the peer certificate of the resumed TLS session has expired since"
    return ""


# server contexts send one ticket per handshake (OpenSSL's default is two): a client keeps
# only the newest session per upstream, so a second ticket is encrypted and sent for nothing
SERVER_TICKETS = 1


def _base(
    purpose: ssl.Purpose, cert_chain_pem: str, key_pem: str, trust_bundle_pem: str
) -> ssl.SSLContext:
    ctx: ssl.SSLContext
    if purpose is ssl.Purpose.CLIENT_AUTH:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.sslobject_class = RecordSizedSSLObject  # an instance attribute: the type stays
        ctx.num_tickets = SERVER_TICKETS  # ssl.SSLContext (limit_session_cache checks it)
        # stateful TLS 1.3 tickets: the session stays in this context's cache and the ticket
        # only names it, so a resumption neither serialises nor re-parses the client
        # certificate (OpenSSL 3.0's decoders made that ~0.5 ms of a resumed handshake); such
        # tickets can be offered again and again (``SessionCache``) and die with the context
        # at the next rotation
        ctx.options |= ssl.OP_NO_TICKET
    else:
        ctx = ResumingClientContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    _load_chain(ctx, cert_chain_pem, key_pem)
    try:
        ctx.load_verify_locations(cadata=trust_bundle_pem)
    except ssl.SSLError as exc:
        raise TlsConfigError(f"cannot load trust bundle: {exc.reason or exc}") from None
    return ctx


# stateful sessions a server context keeps (OpenSSL's default: 20,480, ~66 MB). Every
# connection's ticket adds one, kept until it expires (2 h) or is evicted oldest first; ~3.3 KB
# each (measured: 3,000 sessions, +10 MB RSS), so at most ~27 MB. Clients offer a session at
# most ``SESSION_REFRESH_SECONDS`` old; measured under mtls-noreuse -c50 (~800 new connections
# a second): 8,192 resumed 100 %, 2,048 only 92-97 %.
SERVER_SESSION_CACHE = 8192
_SSL_CTRL_SET_SESS_CACHE_SIZE = 42
_SSL_CTRL_GET_SESS_CACHE_SIZE = 43


def limit_session_cache(ctx: ssl.SSLContext, size: int = SERVER_SESSION_CACHE) -> bool:
    """Cap ``ctx``'s server-side session cache (``SSL_CTX_sess_set_cache_size``, which
    Python's ``ssl`` does not offer) on CPython 3.11; False when not possible here (the
    context then keeps OpenSSL's default)."""
    import sys

    if sys.implementation.name != "cpython" or sys.version_info[:2] != (3, 11):
        return False
    try:
        import _ssl
        import ctypes

        lib = ctypes.CDLL(_ssl.__file__)
        ctrl = lib.SSL_CTX_ctrl
        get_ctx = lib.SSL_get_SSL_CTX
    except (ImportError, OSError, AttributeError):
        return False
    vp = ctypes.c_void_p
    ctrl.argtypes, ctrl.restype = [vp, ctypes.c_int, ctypes.c_long, vp], ctypes.c_long
    get_ctx.argtypes, get_ctx.restype = [vp], vp
    if type(ctx) is not ssl.SSLContext or not isinstance(ctx, _ssl._SSLContext):
        return False
    head = object.__basicsize__
    ctx_p = vp.from_address(id(ctx) + head).value  # PySSLContext {PyObject_HEAD; SSL_CTX *ctx}
    # check the layout on a throwaway connection of this context before writing anything
    probe = ctx.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_side=True)
    sslobj = probe._sslobj  # type: ignore[attr-defined]  # private: the _ssl object
    if type(sslobj) is not _ssl._SSLSocket:  # type: ignore[attr-defined]  # private type
        return False
    ssl_p = vp.from_address(id(sslobj) + head + ctypes.sizeof(vp)).value
    if not ctx_p or not ssl_p or get_ctx(ssl_p) != ctx_p:
        return False
    ctrl(ctx_p, _SSL_CTRL_SET_SESS_CACHE_SIZE, size, None)
    return bool(ctrl(ctx_p, _SSL_CTRL_GET_SESS_CACHE_SIZE, 0, None) == size)


def server_context(
    cert_chain_pem: str,
    key_pem: str,
    trust_bundle_pem: str,
    require_client_cert: bool = True,
    alpn: tuple[str, ...] = MESH_ALPN,
) -> ssl.SSLContext:
    """Inbound mTLS: ``require_client_cert`` for STRICT, False for PERMISSIVE-over-TLS."""
    ctx = _base(ssl.Purpose.CLIENT_AUTH, cert_chain_pem, key_pem, trust_bundle_pem)
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    limit_session_cache(ctx)
    return ctx


def client_context(
    cert_chain_pem: str,
    key_pem: str,
    trust_bundle_pem: str,
    alpn: tuple[str, ...] = MESH_ALPN,
) -> ssl.SSLContext:
    """Outbound mTLS (ISTIO_MUTUAL): present our cert, verify the server's chain."""
    ctx = _base(ssl.Purpose.SERVER_AUTH, cert_chain_pem, key_pem, trust_bundle_pem)
    ctx.verify_mode = ssl.CERT_REQUIRED
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


def peer_certificate_der(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> bytes | None:
    if ssl_object is None:
        return None
    return ssl_object.getpeercert(binary_form=True)


_PEER_FACTS: dict[bytes, tuple[str | None, float]] = {}
_PEER_FACTS_MAX = 1024


def peer_facts(der: bytes) -> tuple[str | None, float]:
    """``(SPIFFE id or None, notAfter timestamp)`` of a DER certificate, memoised: every new
    connection of a peer presents (or resumes) the same certificate, and parsing it with
    ``cryptography`` cost more than the rest of the connection's Python work. Raises
    ``ValueError`` for a certificate that cannot be parsed."""
    facts = _PEER_FACTS.get(der)
    if facts is None:
        cert = x509.load_der_x509_certificate(der)
        facts = (spiffe_id_of(cert), cert.not_valid_after_utc.timestamp())
        if len(_PEER_FACTS) >= _PEER_FACTS_MAX:
            _PEER_FACTS.clear()  # certificates rotate: start over now and then
        _PEER_FACTS[der] = facts
    return facts


def peer_spiffe_id(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str | None:
    """The peer certificate's ``spiffe://`` URI SAN, None without cert or SAN."""
    der = peer_certificate_der(ssl_object)
    if not der:
        return None
    try:
        return peer_facts(der)[0]
    except ValueError:
        return None


def verify_peer(
    ssl_object: ssl.SSLObject | ssl.SSLSocket | None, expected: set[str] | frozenset[str] | None
) -> tuple[bool, str]:
    """Check the peer's SPIFFE id against ``expected`` (``spiffe://`` prefix optional).

    ``expected=None`` accepts any SPIFFE id from the trust bundle. Returns ``(ok, reason)``.
    """
    der = peer_certificate_der(ssl_object)
    if not der:
        return False, "peer presented no certificate (mTLS required)"
    try:
        sid = peer_facts(der)[0]
    except ValueError as exc:
        return False, f"peer certificate cannot be parsed: {exc}"
    if sid is None:
        return False, "peer certificate has no SPIFFE URI SAN (not a mesh workload certificate)"
    if expected is not None:
        want = {to_principal(e) for e in expected}
        if to_principal(sid) not in want:
            return (
                False,
                f"peer identity {sid} is not one of the expected {', '.join(sorted(want))}",
            )
    return True, f"peer identity {sid}"


def describe_tls_error(exc: BaseException) -> str:
    """A readable reason for a failed handshake (OpenSSL's verify message when there is one)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        msg = exc.verify_message or str(exc)
        hints = {
            "certificate has expired": "the peer's certificate has expired (is its sidecar renewing?)",
            "unable to get local issuer certificate": (
                "the peer's certificate is not signed by a root in our trust bundle (another CA?)"
            ),
            "self-signed certificate in certificate chain": (
                "the peer's certificate is not signed by a root in our trust bundle (another CA?)"
            ),
            "self-signed certificate": "the peer's certificate is self-signed and not in our trust bundle",
            "certificate is not yet valid": "the peer's certificate is not yet valid (clock skew?)",
        }
        for k, v in hints.items():
            if k in msg:
                return f"{v} [{msg}]"
        return f"certificate verification failed: {msg}"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or str(exc)
        if reason in ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "TLSV13_ALERT_CERTIFICATE_REQUIRED"):
            return f"client presented no certificate but mTLS is required [{reason}]"
        if reason in ("TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_BAD_CERTIFICATE"):
            return f"the peer rejected our certificate [{reason}]"
        if reason == "SSLV3_ALERT_CERTIFICATE_EXPIRED":
            return f"the peer says our certificate has expired [{reason}]"
        return f"TLS error: {reason}"
    if isinstance(exc, (ConnectionResetError, BrokenPipeError)):
        return f"connection closed during TLS handshake: {exc}"
    return f"{type(exc).__name__}: {exc}"


def xfcc_value(local_spiffe_id: str, peer_cert_der: bytes, peer_spiffe: str | None = None) -> str:
    """Envoy's ``x-forwarded-client-cert`` element: ``By=<us>;Hash=<sha256>;URI=<peer>``.

    Memoised per (us, peer certificate): it is asked for on every inbound mTLS request, and
    parsing the certificate and hashing it was ~8 % of the server sidecar's CPU with keep-alive.
    """
    key = (local_spiffe_id, peer_cert_der, peer_spiffe)
    out = _XFCC.get(key)
    if out is None:
        out = _xfcc_value(local_spiffe_id, peer_cert_der, peer_spiffe)
        if len(_XFCC) >= _XFCC_MAX:
            _XFCC.clear()  # certificates rotate: drop the lot now and then, rebuilt on demand
        _XFCC[key] = out
    return out


_XFCC: dict[tuple[str, bytes, str | None], str] = {}
_XFCC_MAX = 1024


def _xfcc_value(local_spiffe_id: str, peer_cert_der: bytes, peer_spiffe: str | None) -> str:
    if peer_spiffe is None:
        peer_spiffe = peer_facts(peer_cert_der)[0]
    out = f"By={local_spiffe_id};Hash={fingerprint(peer_cert_der)}"
    if peer_spiffe:
        out += f";URI={peer_spiffe}"
    return out


@dataclass(frozen=True, slots=True)
class CertificateBundle:
    cert_chain_pem: str
    key_pem: str
    trust_bundle_pem: str
    spiffe_id: str
    not_after: float


class CertificateStore:
    """The sidecar's current identity; contexts are rebuilt lazily after each ``update``."""

    __slots__ = (
        "_bundle",
        "_client",
        "_client_alpn",
        "_server",
        "_server_alpn",
        "inbound_stats",
        "version",
    )

    def __init__(self) -> None:
        self._bundle: CertificateBundle | None = None
        # Envoy's listener ``ssl.handshake`` / ``ssl.session_reused`` counters of inbound
        # mTLS (``Stats.listener`` once the sidecar wires it; a private block otherwise)
        self.inbound_stats: dict[str, int] = {"ssl_handshake": 0, "ssl_session_reused": 0}
        self.version = 0
        self._server: dict[bool, ssl.SSLContext] = {}
        self._client: ssl.SSLContext | None = None
        self._client_alpn: dict[tuple[str, ...], ssl.SSLContext] = {}
        self._server_alpn: dict[tuple[bool, tuple[str, ...]], ssl.SSLContext] = {}

    @property
    def bundle(self) -> CertificateBundle | None:
        return self._bundle

    @property
    def ready(self) -> bool:
        return self._bundle is not None

    def update(self, cert_chain_pem: str, key_pem: str, trust_bundle_pem: str) -> CertificateBundle:
        """Install a new certificate (rotation); validates by building a context first."""
        leaf = load_certs(cert_chain_pem)[0]
        sid = spiffe_id_of(leaf) or ""
        client_context(cert_chain_pem, key_pem, trust_bundle_pem)  # raises TlsConfigError
        self._bundle = CertificateBundle(
            cert_chain_pem, key_pem, trust_bundle_pem, sid, leaf.not_valid_after_utc.timestamp()
        )
        self.version += 1
        self._server = {}
        self._client = None
        self._client_alpn = {}
        self._server_alpn = {}
        return self._bundle

    def _need(self) -> CertificateBundle:
        if self._bundle is None:
            raise TlsConfigError(
                "no workload certificate yet: the sidecar has not been issued one by the CA"
            )
        return self._bundle

    def server_context(
        self, require_client_cert: bool = True, alpn: tuple[str, ...] = MESH_ALPN
    ) -> ssl.SSLContext:
        if alpn != MESH_ALPN:  # listeners that accept HTTP/2 offer "h2" first
            key = (require_client_cert, alpn)
            sctx = self._server_alpn.get(key)
            if sctx is None:
                b = self._need()
                sctx = server_context(
                    b.cert_chain_pem, b.key_pem, b.trust_bundle_pem, require_client_cert, alpn
                )
                self._server_alpn[key] = sctx
            return sctx
        ctx = self._server.get(require_client_cert)
        if ctx is None:
            b = self._need()
            ctx = server_context(
                b.cert_chain_pem, b.key_pem, b.trust_bundle_pem, require_client_cert
            )
            self._server[require_client_cert] = ctx
        return ctx

    def client_context(self, alpn: tuple[str, ...] = MESH_ALPN) -> ssl.SSLContext:
        if alpn != MESH_ALPN:  # HTTP/2 pools: one more cached context per ALPN list
            ctx = self._client_alpn.get(alpn)
            if ctx is None:
                b = self._need()
                ctx = client_context(b.cert_chain_pem, b.key_pem, b.trust_bundle_pem, alpn)
                self._client_alpn[alpn] = ctx
            return ctx
        if self._client is None:
            b = self._need()
            self._client = client_context(b.cert_chain_pem, b.key_pem, b.trust_bundle_pem)
        return self._client


# --------------------------------------------------------------------------- inbound accept


TLS_HANDSHAKE_RECORD = 0x16


def looks_like_tls(first: bytes) -> bool:
    """True when the first byte opens a TLS handshake record (Envoy's tls_inspector test)."""
    return bool(first) and first[0] == TLS_HANDSHAKE_RECORD


def inbound_tls_policy(mode: str, is_tls: bool) -> tuple[bool, bool, str]:
    """What PeerAuthentication ``mode`` does with a connection: ``(accept, terminate_tls, reason)``.

    - STRICT: only mTLS (client certificate required); plaintext is refused.
    - PERMISSIVE: mTLS when the client speaks TLS, plaintext otherwise.
    - DISABLE: no mTLS; TLS bytes are passed through to the app untouched.
    """
    if mode == "DISABLE":
        return True, False, "mTLS disabled"
    if is_tls:
        return True, True, "mTLS"
    if mode == "STRICT":
        return False, False, "plaintext connection refused: PeerAuthentication mode is STRICT"
    return True, False, "plaintext (PERMISSIVE)"


async def _peek(loop: asyncio.AbstractEventLoop, sock: socket.socket, timeout: float) -> bytes:
    # the client's first bytes (a ClientHello) are usually there by the time the connection
    # is accepted: then no reader, future and loop iteration before the handshake starts
    try:
        return sock.recv(1, socket.MSG_PEEK)
    except (BlockingIOError, InterruptedError):
        pass
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(sock.fileno(), ready)
    try:
        async with asyncio.timeout(timeout):
            await fut
    finally:
        loop.remove_reader(sock.fileno())
    return sock.recv(1, socket.MSG_PEEK)


class InboundRefused(ConnectionError):
    """An inbound connection refused by PeerAuthentication or a failed handshake (``reason``)."""


async def accept_inbound(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    protocol_factory: Callable[[], asyncio.Protocol],
    mode: str,
    store: CertificateStore,
    handshake_timeout: float = 10.0,
) -> tuple[asyncio.Transport, asyncio.Protocol, str]:
    """Sniff an accepted socket, apply ``mode`` and hand it to ``protocol_factory``.

    Works on uvloop and the stdlib loop: mTLS runs on diktyo's record layer
    (``tlsrecord.TlsTransport``) over a plain TCP transport. Returns
    ``(transport, protocol, reason)``; raises ``InboundRefused`` with a readable reason and
    closes the socket when the connection is refused or the handshake fails. The peer's
    SPIFFE id is then ``peer_spiffe_id(transport.get_extra_info("ssl_object"))``.
    """
    sock.setblocking(False)
    try:
        first = await _peek(loop, sock, handshake_timeout)
    except (TimeoutError, OSError) as exc:
        sock.close()
        raise InboundRefused(f"no data from client before the timeout: {exc}") from None
    if not first:
        sock.close()
        raise InboundRefused("client closed the connection before sending anything")
    accept, terminate, reason = inbound_tls_policy(mode, looks_like_tls(first))
    if not accept:
        sock.close()
        raise InboundRefused(reason)
    # build the protocol here: the caller gets it, not the transport's (TLS: the record layer)
    protocol = protocol_factory()
    if not terminate:
        transport, _ = await loop.connect_accepted_socket(lambda: protocol, sock)
        return transport, protocol, reason
    try:
        ctx = store.server_context(require_client_cert=True, alpn=INBOUND_ALPN)
    except TlsConfigError as exc:
        sock.close()
        raise InboundRefused(str(exc)) from None
    from diktyo.proxy.network.tlsrecord import new_tls

    # TLS on the plain TCP transport: diktyo's record layer (``tlsrecord``), not uvloop's
    layer, handshake = new_tls(loop, ctx, protocol, True, None, handshake_timeout)
    transport = cast(asyncio.Transport, layer)  # it is one, without inheriting the class
    try:
        await loop.connect_accepted_socket(lambda: layer, sock)
        await handshake
    except (ssl.SSLError, OSError, TimeoutError) as exc:
        transport.abort()
        sock.close()
        raise InboundRefused(describe_tls_error(exc)) from None
    except BaseException:  # cancelled (the listener closes): nothing stays open
        transport.abort()
        sock.close()
        raise
    so = transport.get_extra_info("ssl_object")
    if so is not None:
        st = store.inbound_stats
        st["ssl_handshake"] += 1
        if so.session_reused:
            st["ssl_session_reused"] += 1
            problem = resumed_peer_problem(so)
            if problem:
                transport.abort()
                raise InboundRefused(problem)
    return transport, protocol, reason


# --------------------------------------------------------------------------- outbound (DestinationRule tls)


def upstream_context(
    tls: TlsSettings | None, store: CertificateStore, alpn: tuple[str, ...] = ()
) -> ssl.SSLContext | None:
    """The client context for a cluster's ``trafficPolicy.tls`` (None = plaintext).

    ``ISTIO_MUTUAL`` uses the workload certificate from ``store``; ``SIMPLE`` / ``MUTUAL`` use
    the files named in the DestinationRule (system CAs when ``caCertificates`` is unset).
    """
    if tls is None or tls.mode == "DISABLE":
        return None
    if tls.mode == "ISTIO_MUTUAL":
        return store.client_context(alpn) if alpn else store.client_context()
    key = (tls, alpn, _file_versions(tls))
    ctx = _FILE_CONTEXTS.get(key)
    if ctx is None:
        ctx = _file_context(tls, alpn)
        if len(_FILE_CONTEXTS) >= _FILE_CONTEXTS_MAX:
            _FILE_CONTEXTS.popitem(last=False)
        _FILE_CONTEXTS[key] = ctx
    return ctx


# SIMPLE / MUTUAL contexts by (settings, ALPN, file versions): built once per change of the
# DestinationRule or of its certificate files (loading the system CAs alone takes ~10 ms)
_FILE_CONTEXTS: OrderedDict[Hashable, ssl.SSLContext] = OrderedDict()
_FILE_CONTEXTS_MAX = 256


def _file_versions(tls: TlsSettings) -> tuple[tuple[int, int], ...]:
    out = []
    for path in (tls.ca_certificates, tls.client_certificate, tls.private_key):
        try:
            st = os.stat(path) if path else None
        except OSError:
            st = None
        out.append((st.st_mtime_ns, st.st_ino) if st is not None else (0, 0))
    return tuple(out)


def _file_context(tls: TlsSettings, alpn: tuple[str, ...]) -> ssl.SSLContext:
    """``ssl.create_default_context`` for a DestinationRule's files, resuming sessions."""
    ctx = ResumingClientContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED + check_hostname
    try:
        if tls.ca_certificates:
            ctx.load_verify_locations(cafile=tls.ca_certificates)
        else:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
        if tls.mode == "MUTUAL":
            if not (tls.client_certificate and tls.private_key):
                raise TlsConfigError(
                    "tls mode MUTUAL needs clientCertificate and privateKey in the DestinationRule"
                )
            ctx.load_cert_chain(tls.client_certificate, tls.private_key)
    except (OSError, ssl.SSLError) as exc:
        raise TlsConfigError(f"cannot build upstream TLS context: {exc}") from None
    if tls.insecure_skip_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif tls.subject_alt_names:
        ctx.check_hostname = False  # checked by verify_upstream against subjectAltNames
    if alpn:
        ctx.set_alpn_protocols([a for a in alpn if not a.startswith("istio")])
    return ctx


def expected_upstream_ids(tls: TlsSettings | None, endpoint_principal: str) -> set[str] | None:
    """Identities an ``ISTIO_MUTUAL`` upstream may present: the DestinationRule's
    ``subjectAltNames`` if set, else the endpoint's own SPIFFE id, else any (None)."""
    if tls is not None and tls.subject_alt_names:
        return set(tls.subject_alt_names)
    if endpoint_principal:
        return {endpoint_principal}
    return None


def verify_upstream(
    ssl_object: ssl.SSLObject | ssl.SSLSocket | None,
    tls: TlsSettings | None,
    endpoint_principal: str = "",
) -> tuple[bool, str]:
    """Post-handshake check of an upstream connection (call right after connect)."""
    if tls is None or tls.mode == "DISABLE" or tls.insecure_skip_verify:
        return True, "not verified"
    if tls.mode == "ISTIO_MUTUAL":
        return verify_peer(ssl_object, expected_upstream_ids(tls, endpoint_principal))
    if not tls.subject_alt_names:
        return True, "verified by hostname"
    der = peer_certificate_der(ssl_object)
    if not der:
        return False, "upstream presented no certificate"
    cert = x509.load_der_x509_certificate(der)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = set(san.get_values_for_type(x509.DNSName)) | set(
            san.get_values_for_type(x509.UniformResourceIdentifier)
        )
    except x509.ExtensionNotFound:
        names = set()
    if names & set(tls.subject_alt_names):
        return True, "subjectAltNames matched"
    return False, (
        f"upstream certificate names {sorted(names)} match none of subjectAltNames "
        f"{list(tls.subject_alt_names)}"
    )
