"""HTTP/2 codec on libnghttp2 (C, through cffi): the same events, limits and counters as the
`h2` codec (``http2.py``), at a fraction of its CPU.

Theory of operation
-------------------
Two ways to reach libnghttp2, chosen once per process (``load()``; ``mode()`` says which):

- **cffi API mode** (the default when built): ``_nghttp2_api``, a C extension that
  ``setup.py`` compiles from ``_nghttp2_build.py``. Its C callbacks collect each header block
  into one buffer and call Python once per frame that matters (``dk_py_*`` below, plain
  integers in); outgoing header blocks go down as one ``name\0value\0...`` blob.
- **cffi ABI mode** (no compiler at install, a stale extension, ``DIKTYO_NGHTTP2_CFFI=abi``):
  ``ffi.dlopen("libnghttp2.so.14")`` with a hand-written declaration of the few types and
  functions used (no headers, no build step); libnghttp2 calls Python per header field.

After that point both modes run the same methods (``_headers_frame``, ``_frame``, ...). One set
of C callbacks is shared by every session; each session's ``user_data`` leads to its Python
codec (ABI: a handle; API: a C context holding the handle). nghttp2 does the framing, HPACK,
the stream state machine, flow-control bookkeeping and HTTP/2 message validation (pseudo-
headers, connection-specific and upper-case names, content-length against DATA); this module
turns its callbacks into the sink calls of ``codec/events.py`` and adds the protections that
libnghttp2 1.52 lacks or applies differently:

- every frame header passes ``on_begin_frame`` before its payload is read, where the per-frame
  limits of the `h2` codec apply unchanged: the header block that HEADERS + CONTINUATION
  accumulate (**CONTINUATION flood**, CVE-2024-28182: 1.52 has no ``max_continuations``),
  consecutive empty frames, PRIORITY and WINDOW_UPDATE floods, PING/SETTINGS acknowledgements
  queued while the transport does not drain them;
- the decoded header list size and field count are counted in ``on_header``;
- **rapid reset** (CVE-2023-44487): 1.52 has no ``stream_reset_rate_limit``; premature resets
  are counted as in the `h2` codec;
- nghttp2's own limits are set too: ``max_settings`` (entries per SETTINGS frame),
  ``max_outbound_ack``, ``max_send_header_block_length``;
- a malformed message (nghttp2 would reset just that stream) closes the connection with
  GOAWAY(PROTOCOL_ERROR), as Envoy does with ``stream_error_on_invalid_http_messaging: false``
  and as the `h2` codec does; nothing of it reaches the sink, nor anything after it.

A limit that trips makes the callback fail, which stops ``nghttp2_session_mem_recv`` at that
frame; the codec then queues GOAWAY with the limit's error code and raises ``CodecError``.

Flow control: automatic WINDOW_UPDATEs are off; ``acknowledge`` calls
``nghttp2_session_consume`` (withheld while the stream is paused), so a slow consumer stops
the peer at its window. Outbound DATA goes through a data provider reading the stream's
pending buffer; what the peer's window does not admit stays there, the sink hears
``on_send_blocked`` and, once it went out, ``on_send_unblocked``.
"""

from __future__ import annotations

import logging
import os
import struct
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from diktyo.proxy.codec._nghttp2_build import SESSION_API, SUBMIT_API, TYPES_BASE, TYPES_FRAMES
from diktyo.proxy.codec.events import (
    ClientCodec,
    ClientSink,
    CodecError,
    HeaderList,
    RequestHead,
    ResetReason,
    ResponseHead,
    ServerCodec,
    ServerSink,
)
from diktyo.proxy.codec.http2_common import (
    DEFAULT_OPTIONS,
    Http2Options,
    Http2Stats,
)
from diktyo.proxy.codec.http2_common import (
    NghttpUnavailable as NghttpUnavailable,  # re-exported: http2_select, tests
)
from diktyo.proxy.codec.http2_fields import (
    lower_pairs,
    request_header_block,
    request_header_list,
    response_header_block,
)

if TYPE_CHECKING:
    from diktyo.proxy.http.h2_connection import Http2Connection
    from diktyo.proxy.network.h2pool import H2UpstreamConnection

log = logging.getLogger("diktyo.proxy")

_CDEF = (
    TYPES_BASE
    + TYPES_FRAMES
    + """
typedef int (*nghttp2_on_begin_frame_callback)(nghttp2_session *, const nghttp2_frame_hd *,
    void *);
typedef int (*nghttp2_on_frame_recv_callback)(nghttp2_session *, const nghttp2_frame *, void *);
typedef int (*nghttp2_on_invalid_frame_recv_callback)(nghttp2_session *, const nghttp2_frame *,
    int, void *);
typedef int (*nghttp2_on_data_chunk_recv_callback)(nghttp2_session *, uint8_t, int32_t,
    const char *, size_t, void *);
typedef int (*nghttp2_on_stream_close_callback)(nghttp2_session *, int32_t, uint32_t, void *);
typedef int (*nghttp2_on_header_callback)(nghttp2_session *, const nghttp2_frame *,
    const char *, size_t, const char *, size_t, uint8_t, void *);
typedef int (*nghttp2_on_begin_headers_callback)(nghttp2_session *, const nghttp2_frame *,
    void *);
typedef int (*nghttp2_error_callback2)(nghttp2_session *, int, const char *, size_t, void *);

int nghttp2_session_callbacks_new(nghttp2_session_callbacks **callbacks_ptr);
void nghttp2_session_callbacks_set_on_begin_frame_callback(nghttp2_session_callbacks *,
    nghttp2_on_begin_frame_callback);
void nghttp2_session_callbacks_set_on_frame_recv_callback(nghttp2_session_callbacks *,
    nghttp2_on_frame_recv_callback);
void nghttp2_session_callbacks_set_on_invalid_frame_recv_callback(nghttp2_session_callbacks *,
    nghttp2_on_invalid_frame_recv_callback);
void nghttp2_session_callbacks_set_on_data_chunk_recv_callback(nghttp2_session_callbacks *,
    nghttp2_on_data_chunk_recv_callback);
void nghttp2_session_callbacks_set_on_stream_close_callback(nghttp2_session_callbacks *,
    nghttp2_on_stream_close_callback);
void nghttp2_session_callbacks_set_on_header_callback(nghttp2_session_callbacks *,
    nghttp2_on_header_callback);
void nghttp2_session_callbacks_set_on_invalid_header_callback(nghttp2_session_callbacks *,
    nghttp2_on_header_callback);
void nghttp2_session_callbacks_set_on_begin_headers_callback(nghttp2_session_callbacks *,
    nghttp2_on_begin_headers_callback);
void nghttp2_session_callbacks_set_error_callback2(nghttp2_session_callbacks *,
    nghttp2_error_callback2);

ssize_t nghttp2_session_mem_send(nghttp2_session *, const char **);
int nghttp2_session_consume_connection(nghttp2_session *, size_t);
"""
    + SESSION_API
    + SUBMIT_API
)

LIBRARY = "libnghttp2.so.14"
MIN_VERSION = 0x013400  # 1.52.0: the release this module's declarations were written against

# frame types and flags (RFC 9113)
_DATA, _HEADERS, _PRIORITY, _RST_STREAM, _SETTINGS = 0, 1, 2, 3, 4
_PING, _GOAWAY, _WINDOW_UPDATE, _CONTINUATION = 6, 7, 8, 9
_END_STREAM, _ACK, _END_HEADERS = 1, 1, 4
# error codes
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0, 1, 2, 3
REFUSED_STREAM, CANCEL, CONNECT_ERROR, ENHANCE_YOUR_CALM = 7, 8, 0xA, 0xB
_CODE_NAMES = {
    0: "NO_ERROR", 1: "PROTOCOL_ERROR", 2: "INTERNAL_ERROR", 3: "FLOW_CONTROL_ERROR",
    4: "SETTINGS_TIMEOUT", 5: "STREAM_CLOSED", 6: "FRAME_SIZE_ERROR", 7: "REFUSED_STREAM",
    8: "CANCEL", 9: "COMPRESSION_ERROR", 0xA: "CONNECT_ERROR", 0xB: "ENHANCE_YOUR_CALM",
    0xC: "INADEQUATE_SECURITY", 0xD: "HTTP_1_1_REQUIRED",
}  # fmt: skip
# libnghttp2 return codes
_ERR_CALLBACK_FAILURE = -902
_ERR_REFUSED_STREAM = -533
_ERR_DEFERRED = -508
_DATA_FLAG_EOF, _DATA_FLAG_NO_END_STREAM = 1, 2
# what _submit sends (the compiled extension's dk_submit takes the same numbers)
_SUBMIT_RESPONSE, _SUBMIT_REQUEST, _SUBMIT_HEADERS, _SUBMIT_TRAILER = 0, 1, 2, 3
_HCAT_REQUEST, _HCAT_RESPONSE, _HCAT_HEADERS = 0, 1, 3
_BIG = 2**31 - 1
_C_BODY_MAX = (
    65_536  # a response body up to this size, whole when its head goes out, is sent from C
)

_RESET_CODES: dict[ResetReason, int] = {
    ResetReason.LOCAL_RESET: CANCEL,
    ResetReason.LOCAL_REFUSED: REFUSED_STREAM,
    ResetReason.REMOTE_RESET: CANCEL,
    ResetReason.REMOTE_REFUSED: REFUSED_STREAM,
    ResetReason.CONNECTION_FAILURE: CONNECT_ERROR,
    ResetReason.CONNECTION_TERMINATION: CANCEL,
    ResetReason.OVERFLOW: REFUSED_STREAM,
    ResetReason.PROTOCOL_ERROR: PROTOCOL_ERROR,
}

_NV = "QQQQB7x"  # nghttp2_nv on LP64: two pointers, two size_t, the flags byte, padding


API_ENV = "DIKTYO_NGHTTP2_CFFI"  # "auto" (default): the compiled extension when built; "abi"
_ffi: Any = None
_lib: Any = None
_api = False  # the compiled extension (cffi API mode, _nghttp2_build.py) runs, not dlopen
_api_note = ""  # why the ABI mode runs
_B: Any = None  # ffi._backend: its newp / cast / from_buffer / unpack skip cffi's wrappers
_T: dict[str, Any] = {}  # C types parsed once
_callbacks: Any = None
_read_cb: Any = None
_keep: list[Any] = []  # the C callbacks must outlive every session
_load_error: str | None = None
_current: Any = None  # the codec inside nghttp2 (feed / _pull): where a callback's error goes


def load() -> tuple[Any, Any]:
    """``(ffi, lib)``; raises ``NghttpUnavailable`` with the reason when it cannot load."""
    global _ffi, _lib, _B, _load_error, _api
    if _lib is not None:
        return _ffi, _lib
    if _load_error is not None:
        raise NghttpUnavailable(_load_error)
    try:
        api = _load_api()
        if api is not None:
            ffi, lib = api
        else:
            import cffi  # type: ignore[import-untyped]  # cffi ships no type stubs

            ffi = cffi.FFI()
            ffi.cdef(_CDEF)
            lib = ffi.dlopen(LIBRARY)
        info = lib.nghttp2_version(0)
        if info == ffi.NULL or info.version_num < MIN_VERSION:
            have = ffi.string(info.version_str).decode() if info != ffi.NULL else "?"
            raise NghttpUnavailable(f"{LIBRARY} is {have}, 1.52.0 or newer is needed")
    except NghttpUnavailable as e:
        _load_error = str(e)
        raise
    except (ImportError, OSError, AttributeError) as e:
        _load_error = (
            f"cannot load {LIBRARY} through cffi ({e}); install the Debian package "
            f"libnghttp2-14 and the PyPI package cffi"
        )
        raise NghttpUnavailable(_load_error) from e
    # ABI mode: ffi._backend's functions skip cffi's Python wrappers; the compiled module's
    # ffi is the C object itself
    _ffi, _lib, _api = ffi, lib, api is not None
    _B = ffi if _api else ffi._backend
    if _api:
        _make_api_callbacks(ffi)
    else:
        for t in ("char[]", "uintptr_t", "nghttp2_nv[]", "nghttp2_data_provider *"):
            _T[t] = ffi.typeof(t)
        _make_callbacks(ffi, lib)
    return ffi, lib


def _load_api() -> tuple[Any, Any] | None:
    """The compiled extension's ``(ffi, lib)``, or None (``_api_note`` says why)."""
    global _api_note
    want = os.environ.get(API_ENV, "").strip().lower() or "auto"
    if want == "abi":
        _api_note = f"{API_ENV}=abi"
        return None
    from diktyo.proxy.codec._nghttp2_build import API_VERSION

    try:
        from diktyo.proxy.codec import _nghttp2_api  # type: ignore[attr-defined]  # built by setup.py
    except ImportError as e:
        _api_note = f"the compiled extension is not built ({e})"
        return None
    have = int(_nghttp2_api.lib.dk_api_version())
    if have != API_VERSION:
        _api_note = f"the compiled extension is stale (version {have}, want {API_VERSION})"
        log.warning("HTTP/2: %s: using cffi's ABI mode; rebuild with `make build`", _api_note)
        return None
    return _nghttp2_api.ffi, _nghttp2_api.lib


_STATE = ("_ffi", "_lib", "_B", "_api", "_api_note", "_load_error", "_callbacks", "_read_cb")


def reload_mode(abi: bool) -> Callable[[], None]:
    """Load libnghttp2 again, in cffi's ABI mode (``abi``) or the compiled extension's; returns
    a function that puts the previous mode back (tests run both). Codecs keep the mode they
    were created in."""
    g = globals()
    saved = {k: g[k] for k in _STATE}
    saved_types = dict(_T)  # the ABI mode's ctypes belong to its ffi: put back with it
    env = os.environ.get(API_ENV)
    g["_lib"] = g["_load_error"] = None
    os.environ[API_ENV] = "abi" if abi else "auto"
    try:
        load()
    finally:
        if env is None:
            os.environ.pop(API_ENV, None)
        else:
            os.environ[API_ENV] = env

    def restore() -> None:
        g.update(saved)
        _T.clear()
        _T.update(saved_types)

    return restore


def mode() -> str:
    """``cffi API`` (the compiled extension) or ``cffi ABI`` (dlopen, no build)."""
    load()
    return "cffi API" if _api else "cffi ABI"


def mode_note() -> str:
    """Why cffi's ABI mode runs ("" when the compiled extension does)."""
    load()
    return "" if _api else _api_note


def version() -> str:
    ffi, lib = load()
    return str(ffi.string(lib.nghttp2_version(0).version_str).decode())


def available() -> bool:
    try:
        load()
    except NghttpUnavailable:
        return False
    return True


def _make_callbacks(ffi: Any, lib: Any) -> None:
    global _callbacks, _read_cb
    # the backend's functions: ffi.from_handle / ffi.unpack are Python wrappers around them
    from_handle = ffi._backend.from_handle
    unpack = ffi._backend.unpack

    def on_begin_frame(session: Any, hd: Any, ud: Any) -> int:
        return int(from_handle(ud)._begin_frame(hd.type, hd.flags, hd.length))

    def on_begin_headers(session: Any, frame: Any, ud: Any) -> int:
        from_handle(ud)._begin_headers(frame.hd.stream_id)
        return 0

    def on_header(
        session: Any, frame: Any, name: Any, nlen: int, value: Any, vlen: int, fl: int, ud: Any
    ) -> int:
        from_handle(ud)._header(frame.hd.stream_id, unpack(name, nlen), unpack(value, vlen))
        return 0

    def on_invalid_header(
        session: Any, frame: Any, name: Any, nlen: int, value: Any, vlen: int, fl: int, ud: Any
    ) -> int:
        codec = from_handle(ud)
        codec._invalid_header(frame.hd.stream_id, unpack(name, nlen), unpack(value, vlen))
        return _ERR_CALLBACK_FAILURE  # stop here: no RST_STREAM, the connection goes

    def on_frame_recv(session: Any, frame: Any, ud: Any) -> int:
        codec = from_handle(ud)
        hd = frame.hd
        t = hd.type
        if t == _HEADERS:
            return int(codec._abi_headers(hd.stream_id, hd.flags, frame.headers.cat))
        a = b = 0
        if t == _RST_STREAM:
            a = frame.rst_stream.error_code
        elif t == _GOAWAY:
            a = frame.goaway.error_code
            b = frame.goaway.last_stream_id
        return int(codec._frame(t, hd.flags, hd.stream_id, a, b))

    def on_invalid_frame_recv(session: Any, frame: Any, err: int, ud: Any) -> int:
        return int(from_handle(ud)._invalid_frame(frame.hd.stream_id, frame.hd.type, err))

    def on_data_chunk(session: Any, flags: int, sid: int, data: Any, n: int, ud: Any) -> int:
        from_handle(ud)._data(sid, unpack(data, n))
        return 0

    def on_stream_close(session: Any, sid: int, code: int, ud: Any) -> int:
        from_handle(ud)._stream_closed(sid, code)
        return 0

    def on_error(session: Any, err: int, msg: Any, n: int, ud: Any) -> int:
        from_handle(ud)._lib_message = unpack(msg, n).decode("latin-1")
        return 0

    def on_read(
        session: Any, sid: int, buf: Any, length: int, flags: Any, src: Any, ud: Any
    ) -> int:
        return int(from_handle(ud)._read(sid, buf, length, flags))

    def fail_cb(exc_type: Any, exc: BaseException | None, tb: Any) -> int:
        # an exception must never unwind through C: it fails the session, and feed() re-raises
        # it (a _Flood becomes GOAWAY); the codec is the one whose feed / _pull runs
        codec = _current
        if codec is not None:
            codec._error = exc
        return _ERR_CALLBACK_FAILURE

    def zero_cb(*a: Any) -> int:
        return 0

    cb_on_begin_frame = ffi.callback(
        "nghttp2_on_begin_frame_callback", on_begin_frame, onerror=fail_cb
    )
    cb_on_begin_headers = ffi.callback(
        "nghttp2_on_begin_headers_callback", on_begin_headers, onerror=fail_cb
    )
    cb_on_header = ffi.callback("nghttp2_on_header_callback", on_header, onerror=fail_cb)
    cb_on_invalid_header = ffi.callback(
        "nghttp2_on_header_callback", on_invalid_header, onerror=fail_cb
    )
    cb_on_frame_recv = ffi.callback(
        "nghttp2_on_frame_recv_callback", on_frame_recv, onerror=fail_cb
    )
    cb_on_invalid_frame_recv = ffi.callback(
        "nghttp2_on_invalid_frame_recv_callback", on_invalid_frame_recv, onerror=fail_cb
    )
    cb_on_data_chunk = ffi.callback(
        "nghttp2_on_data_chunk_recv_callback", on_data_chunk, onerror=fail_cb
    )
    cb_on_stream_close = ffi.callback(
        "nghttp2_on_stream_close_callback", on_stream_close, onerror=fail_cb
    )
    cb_on_error = ffi.callback("nghttp2_error_callback2", on_error, onerror=zero_cb)
    cb_on_read = ffi.callback("nghttp2_data_source_read_callback", on_read, onerror=fail_cb)

    pp = ffi.new("nghttp2_session_callbacks **")
    if lib.nghttp2_session_callbacks_new(pp) != 0:
        raise NghttpUnavailable("nghttp2_session_callbacks_new failed")
    cbs = pp[0]
    lib.nghttp2_session_callbacks_set_on_begin_frame_callback(cbs, cb_on_begin_frame)
    lib.nghttp2_session_callbacks_set_on_begin_headers_callback(cbs, cb_on_begin_headers)
    lib.nghttp2_session_callbacks_set_on_header_callback(cbs, cb_on_header)
    lib.nghttp2_session_callbacks_set_on_frame_recv_callback(cbs, cb_on_frame_recv)
    lib.nghttp2_session_callbacks_set_on_invalid_header_callback(cbs, cb_on_invalid_header)
    lib.nghttp2_session_callbacks_set_on_invalid_frame_recv_callback(cbs, cb_on_invalid_frame_recv)
    lib.nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cbs, cb_on_data_chunk)
    lib.nghttp2_session_callbacks_set_on_stream_close_callback(cbs, cb_on_stream_close)
    lib.nghttp2_session_callbacks_set_error_callback2(cbs, cb_on_error)
    _keep.extend(
        [
            cb_on_begin_frame,
            cb_on_begin_headers,
            cb_on_header,
            cb_on_invalid_header,
            cb_on_frame_recv,
            cb_on_invalid_frame_recv,
            cb_on_data_chunk,
            cb_on_stream_close,
            cb_on_error,
            cb_on_read,
        ]
    )
    _callbacks = cbs
    _read_cb = cb_on_read


def _make_api_callbacks(ffi: Any) -> None:
    """The Python side of the compiled extension: one call per frame that matters, plain
    integers in (``_nghttp2_build.py`` does the rest in C). Each extern is named explicitly:
    mypyc's compiled nested functions have no ``__name__`` for cffi to take it from."""
    from_handle = ffi.from_handle
    unpack = ffi.unpack

    def fail_cb(exc_type: Any, exc: BaseException | None, tb: Any) -> int:
        codec = _current  # as in ABI mode
        if codec is not None:
            codec._error = exc
        return _ERR_CALLBACK_FAILURE

    def zero_cb(*a: Any) -> int:
        return 0

    @ffi.def_extern(name="dk_py_begin_frame", onerror=fail_cb)  # type: ignore[untyped-decorator]  # cffi is untyped
    def dk_py_begin_frame(ud: Any, t: int, flags: int, length: int) -> int:
        codec = from_handle(ud)
        if t > _CONTINUATION or t not in (_DATA, _HEADERS, _CONTINUATION):
            return int(codec._begin_frame(t, flags, length))  # no C-side counter involved
        ctx = codec._ctx
        codec._empty_run = ctx.empty_run
        codec._block = ctx.block
        rv = int(codec._begin_frame(t, flags, length))
        ctx.empty_run = codec._empty_run
        ctx.block = codec._block
        return rv

    @ffi.def_extern(name="dk_py_frame", onerror=fail_cb)  # type: ignore[untyped-decorator]  # cffi is untyped
    def dk_py_frame(ud: Any, t: int, flags: int, sid: int, a: int, b: int) -> int:
        return int(from_handle(ud)._frame(t, flags, sid, a, b))

    @ffi.def_extern(name="dk_py_headers", onerror=fail_cb)  # type: ignore[untyped-decorator]  # cffi is untyped
    def dk_py_headers(ud: Any, sid: int, flags: int, cat: int, buf: Any, n: int) -> int:
        return int(from_handle(ud)._api_headers(sid, flags, cat, unpack(buf, n)))

    @ffi.def_extern(name="dk_py_data", onerror=fail_cb)  # type: ignore[untyped-decorator]  # cffi is untyped
    def dk_py_data(ud: Any, sid: int, buf: Any, n: int, end: int) -> int:
        codec = from_handle(ud)
        if codec._closed:
            return _ERR_CALLBACK_FAILURE
        return int(codec._data_frame(sid, unpack(buf, n) if n else b"", end))

    @ffi.def_extern(name="dk_py_close", onerror=fail_cb)  # type: ignore[untyped-decorator]  # cffi is untyped
    def dk_py_close(ud: Any, sid: int, code: int) -> int:
        from_handle(ud)._stream_closed(sid, code)
        return 0

    @ffi.def_extern(name="dk_py_invalid_header", onerror=fail_cb)  # type: ignore[untyped-decorator]  # cffi is untyped
    def dk_py_invalid_header(ud: Any, sid: int, name: Any, n: int) -> int:
        from_handle(ud)._invalid_header(sid, unpack(name, n), b"")
        return _ERR_CALLBACK_FAILURE

    @ffi.def_extern(name="dk_py_invalid_frame", onerror=fail_cb)  # type: ignore[untyped-decorator]  # cffi is untyped
    def dk_py_invalid_frame(ud: Any, sid: int, t: int, err: int) -> int:
        return int(from_handle(ud)._invalid_frame(sid, t, err))

    @ffi.def_extern(name="dk_py_error", onerror=zero_cb)  # type: ignore[untyped-decorator]  # cffi is untyped
    def dk_py_error(ud: Any, msg: Any, n: int) -> int:
        from_handle(ud)._lib_message = unpack(msg, n).decode("latin-1")
        return 0

    @ffi.def_extern(name="dk_py_read", onerror=fail_cb)  # type: ignore[untyped-decorator]  # cffi is untyped
    def dk_py_read(ud: Any, sid: int, buf: Any, length: int, flags: Any) -> int:
        return int(from_handle(ud)._read(sid, buf, length, flags))


def _nva(pairs: HeaderList) -> tuple[Any, Any, int]:
    """``(keep-alive, nghttp2_nv *, n)`` for ``pairs``: one blob of names and values and one
    packed array pointing into it (nghttp2 copies both on submit)."""
    B = _B
    blob = b"".join([b for pair in pairs for b in pair])
    buf = B.from_buffer(_T["char[]"], blob, False)
    off = int(B.cast(_T["uintptr_t"], buf))
    recs: list[int] = []
    for name, value in pairs:
        ln = len(name)
        lv = len(value)
        recs += (off, off + ln, ln, lv, 0)
        off += ln + lv
    count = len(pairs)
    packed = struct.pack(_NV * count, *recs)
    return (buf, packed), B.from_buffer(_T["nghttp2_nv[]"], packed, False), count


class _Flood(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class _Stream:
    __slots__ = (
        "blocked", "end", "headers", "hsize", "local_done", "opened_at", "owed", "paused",
        "pending", "prd", "rejected", "remote_done", "trailers", "deferred", "head",
    )  # fmt: skip

    def __init__(self, opened_at: float) -> None:
        self.opened_at = opened_at
        self.pending = bytearray()
        self.end = False  # END_STREAM once pending is out
        self.trailers: HeaderList | None = None  # ... or these trailers
        self.prd = False  # a data provider is submitted
        self.deferred = False  # ... and waits for data (NGHTTP2_ERR_DEFERRED)
        self.blocked = False
        self.paused = False
        self.owed = 0
        self.local_done = False
        self.remote_done = False
        self.headers: HeaderList = []
        self.hsize = 0
        self.rejected = 0  # why the header block is refused: 0 no, 1 too many fields
        # a response head not submitted yet (compiled extension): it goes out with its whole
        # body (dk_submit_body) once the body ends, or with a data provider at the next _pull
        self.head: bytes | None = None


class _NgCodec:
    protocol = "HTTP/2"
    multiplexed = True
    implementation = "nghttp2"

    sink: Any  # ServerSink | ClientSink: one type for both sides, which mypyc needs

    def __init__(
        self,
        client_side: bool,
        options: Http2Options,
        stats: Http2Stats | None,
        clock: Callable[[], float],
    ) -> None:
        ffi, lib = load()
        self._ffi, self._lib = ffi, lib
        self.options = options
        self.stats = stats if stats is not None else Http2Stats()
        self._clock = clock
        self._client = client_side
        self._handle = ffi.new_handle(self)
        self._api = _api
        self._ctx: Any = None
        if _api:
            self._ctx = ffi.gc(
                lib.dk_ctx_new(self._handle, options.max_header_list_bytes), lib.dk_ctx_del
            )
            callbacks, ud = lib.dk_callbacks(), self._ctx
            self._mem_send = lib.dk_mem_send
        else:
            callbacks, ud = _callbacks, self._handle
            self._mem_send = lib.nghttp2_session_mem_send
        opt_pp = ffi.new("nghttp2_option **")
        lib.nghttp2_option_new(opt_pp)
        opt = opt_pp[0]
        lib.nghttp2_option_set_no_auto_window_update(opt, 1)
        lib.nghttp2_option_set_max_settings(opt, 32)
        lib.nghttp2_option_set_max_outbound_ack(opt, options.max_outbound_control_frames + 1)
        lib.nghttp2_option_set_max_send_header_block_length(opt, 1 << 20)
        lib.nghttp2_option_set_peer_max_concurrent_streams(opt, 100)
        sp = ffi.new("nghttp2_session **")
        new = lib.nghttp2_session_client_new2 if client_side else lib.nghttp2_session_server_new2
        if new(sp, callbacks, ud, opt) != 0:
            lib.nghttp2_option_del(opt)
            raise NghttpUnavailable("nghttp2 session creation failed")
        lib.nghttp2_option_del(opt)  # the session keeps a copy
        self._session = ffi.gc(sp[0], lib.nghttp2_session_del)
        iv = ffi.new("nghttp2_settings_entry[]", 4)
        entries = [
            (3, options.max_concurrent_streams),
            (4, options.initial_stream_window_size),
            (6, options.max_header_list_bytes),
        ]
        if client_side:
            entries.append((2, 0))  # ENABLE_PUSH
        for i, (k, v) in enumerate(entries):
            iv[i].settings_id = k
            iv[i].value = v
        lib.nghttp2_submit_settings(self._session, 0, iv, len(entries))
        if options.initial_connection_window_size > 65_535:
            lib.nghttp2_session_set_local_window_size(
                self._session, 0, 0, options.initial_connection_window_size
            )
        self._streams: dict[int, _Stream] = {}
        self._hdr: dict[int, _Stream] = {}  # streams whose header block is being decoded
        self._prd: set[int] = set()  # streams with a submitted data provider
        self._unblocked: list[int] = []
        self._unsent: list[int] = []  # streams whose response head waits (_Stream.head)
        self._closed = False
        self._draining = False
        self._goaway_last = _BIG
        self.goaway_received = False
        self.peer_settings_received = False
        self.last_stream_id_from_peer = _BIG
        self._error: BaseException | None = None
        self._fatal: tuple[int, str] | None = None  # a malformed stream: close after this read
        self._lib_message = ""
        self._block_in: bytes | None = None  # the compiled extension's header block, as is
        self._nva_keep: Any = None
        self._out: list[bytes] = []
        self._dead: bytes | None = None  # after a connection error: the GOAWAY to send
        self._busy = False  # inside nghttp2_session_mem_recv (no mem_send from there)
        self._pp = ffi.new("const char **")
        # flood accounting (as the h2 codec)
        self._control_queued = 0
        self._write_paused = False
        self._empty_run = 0
        self._block = 0  # bytes of the header block being received
        self._window_updates_in = 0
        self._data_frames_out = 0
        self._streams_opened = 0
        self._premature = 0
        self._priority_in = 0
        # the peer's SETTINGS_MAX_CONCURRENT_STREAMS (updated when its SETTINGS arrive)
        self._peer_streams = int(lib.nghttp2_session_get_remote_settings(self._session, 3))

    # ------------------------------------------------------------------ shared API

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    @property
    def closed(self) -> bool:
        return self._closed or self.goaway_received or self._draining

    def data_to_send(self) -> bytes:
        if self._busy:
            return b""  # called from a callback of feed(): its caller flushes afterwards
        if not self._write_paused:
            self._control_queued = 0
        if self._dead is None:
            self._pull()
        elif self._dead:
            self._out.append(self._dead)  # our GOAWAY, and nothing after it
            self._dead = b""
        out = self._out
        if not out:
            return b""
        self._out = []
        return out[0] if len(out) == 1 else b"".join(out)

    def _pull(self) -> None:
        """Serialize what nghttp2 has queued into ``self._out`` (frames in order)."""
        global _current
        if self._unsent:  # response heads whose body did not end in time: with a provider
            sids, self._unsent = self._unsent, []
            for sid in sids:
                st = self._streams.get(sid)
                if st is not None and st.head is not None:
                    self._submit_head(sid, st)
        prev, _current = _current, self
        try:
            self._serialize()
        finally:
            _current = prev
        if self._prd:
            for sid in list(self._prd):
                st = self._streams.get(sid)
                if st is not None and st.pending and not st.blocked:
                    st.blocked = True
                    self.sink.on_send_blocked(sid)
        if self._unblocked:
            sids, self._unblocked = self._unblocked, []
            for sid in sids:
                self.sink.on_send_unblocked(sid)

    def _serialize(self) -> None:
        unpack = _B.unpack
        pp = self._pp
        out = self._out
        session = self._session
        if self._api:  # all queued frames in one call
            n = self._mem_send(session, self._ctx, pp)
            if n > 0:
                out.append(unpack(pp[0], n))
            elif n < 0:
                raise MemoryError("HTTP/2: out of memory serializing frames")
        else:
            mem_send = self._mem_send
            while True:
                n = mem_send(session, pp)
                if n <= 0:
                    break
                out.append(unpack(pp[0], n))

    def set_write_paused(self, paused: bool) -> None:
        self._write_paused = paused

    def feed(self, data: bytes) -> None:
        global _current
        if self._closed:
            return
        self._busy = True
        prev, _current = _current, self
        try:
            rv = self._lib.nghttp2_session_mem_recv(self._session, data, len(data))
        finally:
            self._busy = False
            _current = prev
        err, self._error = self._error, None
        if err is not None:
            if isinstance(err, _Flood):
                self._fail(err.code, str(err))
            raise err  # a bug in a sink: as the h2 codec, it propagates
        if self._fatal is not None:
            code, message = self._fatal
            self._fail(code, message)
        if rv < 0:
            ctx = self._ctx
            if ctx is not None and ctx.overflow:  # the compiled extension counts in C
                ctx.overflow = 0
                self.stats.header_overflow += 1
                self._fail(
                    ENHANCE_YOUR_CALM,
                    f"header list too large: over {self.options.max_header_list_bytes} bytes",
                )
            if rv == -904:  # NGHTTP2_ERR_FLOODED: its own outbound ACK limit
                self.stats.outbound_control_flood += 1
                self._fail(ENHANCE_YOUR_CALM, "PING/SETTINGS acknowledgements queued but not "
                           "written: the peer floods and does not read")  # fmt: skip
            msg = self._lib_message or self._ffi.string(self._lib.nghttp2_strerror(rv)).decode()
            self._fail(PROTOCOL_ERROR, msg)
        if self.goaway_received or self._draining:
            return
        self._pull()  # a GOAWAY nghttp2 queued for a connection error shows only once sent
        if not self._lib.nghttp2_session_want_read(self._session):
            self.stats.rx_messaging_error += 1
            code, msg = _goaway_in(self._out)
            self._fail(code, msg or self._lib_message or "protocol error", queue=False)

    def eof(self) -> None:
        self._closed = True
        for sid in list(self._streams):
            self._drop(sid)
            self.sink.on_stream_reset(sid, ResetReason.CONNECTION_TERMINATION)

    def send_data(self, sid: int, data: bytes, end_stream: bool = False) -> None:
        st = self._streams.get(sid)
        if st is None or st.local_done or self._closed:
            return
        if st.head is not None:  # the response head waits for its body
            if not end_stream:
                st.pending += data
                return
            if len(st.pending) + len(data) <= _C_BODY_MAX:
                self._submit_body(sid, st, bytes(st.pending) + data if st.pending else data)
                return
            self._submit_head(sid, st)
        if data:
            st.pending += data
        if end_stream:
            st.end = True
            st.local_done = True
        if st.deferred and (data or end_stream):
            st.deferred = False
            self._lib.nghttp2_session_resume_data(self._session, sid)
        if data and not st.blocked:
            lib = self._lib
            window = min(
                lib.nghttp2_session_get_stream_remote_window_size(self._session, sid),
                lib.nghttp2_session_get_remote_window_size(self._session),
            )
            if len(st.pending) > window:  # more than the peer admits: pause the source now
                st.blocked = True
                self.sink.on_send_blocked(sid)

    def send_trailers(self, sid: int, trailers: HeaderList) -> None:
        st = self._streams.get(sid)
        if st is None or st.local_done or self._closed:
            return
        if st.head is not None:
            self._submit_head(sid, st)
            if sid not in self._streams:
                return
        st.local_done = True
        st.trailers = lower_pairs(trailers)  # sent by the data provider after the last DATA
        if st.deferred:
            st.deferred = False
            self._lib.nghttp2_session_resume_data(self._session, sid)

    def send_reset(self, sid: int, reason: ResetReason) -> None:
        if sid not in self._streams:
            return
        self._drop(sid)
        self._reset_wire(sid, _RESET_CODES.get(reason, CANCEL))

    def acknowledge(self, sid: int, n: int) -> None:
        st = self._streams.get(sid)
        if st is None:
            return
        if st.paused:
            st.owed += n
            return
        self._lib.nghttp2_session_consume(self._session, sid, n)

    def pause_reading(self, sid: int) -> None:
        st = self._streams.get(sid)
        if st is not None:
            st.paused = True

    def resume_reading(self, sid: int) -> None:
        st = self._streams.get(sid)
        if st is not None and st.paused:
            st.paused = False
            if st.owed:
                n, st.owed = st.owed, 0
                self._lib.nghttp2_session_consume(self._session, sid, n)

    def goaway(self, error_code: int = 0, message: str = "") -> None:
        if self._closed or (error_code == 0 and self._draining):
            return
        self.stats.goaway_sent += 1
        last = int(self._lib.nghttp2_session_get_last_proc_stream_id(self._session))
        opaque = message.encode()[:256]
        self._lib.nghttp2_submit_goaway(self._session, 0, last, error_code, opaque, len(opaque))
        if error_code == 0:
            self._goaway_last = last
            self._draining = True
        else:
            self._closed = True

    # ------------------------------------------------------------------ callbacks

    def _begin_frame(self, t: int, flags: int, length: int) -> int:
        """Per-frame limits, before nghttp2 reads the payload (as ``_H2Codec._inspect``)."""
        if self._closed:
            return _ERR_CALLBACK_FAILURE
        o = self.options
        if t in (_DATA, _HEADERS):
            if length or flags & _END_STREAM:
                self._empty_run = 0
            else:
                self._empty_frame()
            if t == _HEADERS:
                self._block = length
        elif t == _CONTINUATION:
            if not length and not flags & _END_HEADERS:
                self._empty_frame()
            self._block += length
            if self._block > o.max_header_list_bytes:
                self.stats.continuation_flood += 1
                raise _Flood(
                    ENHANCE_YOUR_CALM,
                    f"header block of {self._block} bytes across HEADERS/CONTINUATION frames "
                    f"exceeds {o.max_header_list_bytes} bytes",
                )
        elif t in (_PING, _SETTINGS):
            if not flags & _ACK:
                self._control_queued += 1
                if self._control_queued > o.max_outbound_control_frames:
                    self.stats.outbound_control_flood += 1
                    raise _Flood(
                        ENHANCE_YOUR_CALM,
                        f"{self._control_queued} PING/SETTINGS acknowledgements queued but not "
                        f"written (limit {o.max_outbound_control_frames}): the peer floods and "
                        f"does not read",
                    )
        elif t == _WINDOW_UPDATE:
            self._window_updates_in += 1
            limit = 5 + 2 * (
                self._streams_opened
                + o.max_inbound_window_update_frames_per_data_frame_sent * self._data_frames_out
            )
            if self._window_updates_in > limit:
                self.stats.inbound_window_update_frames_flood += 1
                raise _Flood(
                    ENHANCE_YOUR_CALM,
                    f"{self._window_updates_in} WINDOW_UPDATE frames for "
                    f"{self._data_frames_out} DATA frames sent",
                )
        elif t == _PRIORITY:
            self._priority_in += 1
            limit = o.max_inbound_priority_frames_per_stream * (1 + self._streams_opened)
            if self._priority_in > limit:
                self.stats.inbound_priority_frames_flood += 1
                raise _Flood(
                    ENHANCE_YOUR_CALM,
                    f"{self._priority_in} PRIORITY frames for {self._streams_opened} streams "
                    f"(limit {o.max_inbound_priority_frames_per_stream} per stream)",
                )
        return 0

    def _empty_frame(self) -> None:
        self._empty_run += 1
        if self._empty_run > self.options.max_consecutive_inbound_frames_with_empty_payload:
            self.stats.inbound_empty_frames_flood += 1
            raise _Flood(
                ENHANCE_YOUR_CALM,
                f"{self._empty_run} consecutive frames with an empty payload (limit "
                f"{self.options.max_consecutive_inbound_frames_with_empty_payload})",
            )

    def _begin_headers(self, sid: int) -> None:
        st = self._streams.get(sid)
        if st is None:
            st = _Stream(self._clock())
        else:
            st.headers = []
            st.hsize = 0
        self._hdr[sid] = st

    def _header(self, sid: int, name: bytes, value: bytes) -> None:
        st = self._hdr.get(sid)
        if st is None:
            return
        st.hsize += len(name) + len(value) + 32
        if st.hsize > self.options.max_header_list_bytes:
            self.stats.header_overflow += 1
            raise _Flood(
                ENHANCE_YOUR_CALM,
                f"header list too large: over {self.options.max_header_list_bytes} bytes",
            )
        st.headers.append((name, value))

    def _invalid_header(self, sid: int, name: bytes, value: bytes) -> None:
        """A header field HTTP/2 forbids (upper case, connection-specific, bad characters,
        a pseudo-header out of place): the connection is closed with GOAWAY(PROTOCOL_ERROR)."""
        self._hdr.pop(sid, None)
        self.stats.rx_messaging_error += 1
        if self._fatal is None:
            self._fatal = (
                PROTOCOL_ERROR,
                f"invalid header field {name[:64]!r} on stream {sid}",
            )

    def _invalid_frame(self, sid: int, t: int, err: int) -> int:
        if err == _ERR_REFUSED_STREAM:  # beyond our stream limit or after our GOAWAY
            self._hdr.pop(sid, None)
            if not (self._draining and sid > self._goaway_last):
                self.stats.streams_refused += 1
                self._streams_opened += 1
                try:
                    self._premature_reset(_Stream(self._clock()))
                except _Flood as e:
                    self._error = e
            return 0
        # a malformed message: nghttp2 resets the stream; diktyo closes the connection
        self._hdr.pop(sid, None)
        msg = self._lib_message or self._ffi.string(self._lib.nghttp2_strerror(err)).decode()
        limit = self.options.max_concurrent_streams
        if t == _HEADERS and sid not in self._streams and len(self._streams) >= limit:
            self.stats.streams_refused += 1
            msg = f"stream beyond SETTINGS_MAX_CONCURRENT_STREAMS ({limit}) ({msg})"
        else:
            self.stats.rx_messaging_error += 1
        if self._fatal is None:
            self._fatal = (PROTOCOL_ERROR, f"malformed frame on stream {sid}: {msg}")
        return 0

    def _abi_headers(self, sid: int, flags: int, cat: int) -> int:
        """ABI mode: a header block's fields arrived one ``_header`` call each."""
        if self._fatal is not None:
            return 0
        st = self._hdr.pop(sid, None)
        if st is None:
            return 0
        return self._headers_frame(sid, flags, cat, st)

    def _api_headers(self, sid: int, flags: int, cat: int, block: bytes) -> int:
        """The compiled extension: the whole block at once, ``name\0value\0...``, its size
        already checked. A block within the field count goes to ``_headers`` as is (each side
        reads it in one pass); only an oversized one is split into pairs first."""
        if self._closed:
            return _ERR_CALLBACK_FAILURE
        if self._fatal is not None:
            return 0
        st = self._streams.get(sid)
        if st is None:
            st = _Stream(self._clock())
        if block.count(b"\0") > 2 * (self.options.max_headers_count + 4):
            st.headers = _split_block(block)
            return self._headers_frame(sid, flags, cat, st)
        self._block_in = block
        end = bool(flags & _END_STREAM)
        self._headers(sid, st, cat, None, end)
        if end and sid in self._streams:
            self._remote_end(sid, st)
            self._sink_end(sid)
        return 0

    def _headers_frame(self, sid: int, flags: int, cat: int, st: _Stream) -> int:
        hs = st.headers
        if len(hs) > self.options.max_headers_count + 4:
            regular = sum(1 for n, _ in hs if n[:1] != b":")
            if regular > self.options.max_headers_count:
                st.rejected = 1
                st.headers = []
        self._headers(sid, st, cat, st.headers, bool(flags & _END_STREAM))
        if flags & _END_STREAM and sid in self._streams:
            self._remote_end(sid, st)
            self._sink_end(sid)
        return 0

    def _frame(self, t: int, flags: int, sid: int, a: int, b: int) -> int:
        """A frame other than HEADERS; ``a`` is RST_STREAM's / GOAWAY's error code, ``b``
        GOAWAY's last stream id."""
        if self._fatal is not None:
            return 0
        if t == _DATA:
            if flags & _END_STREAM:
                if self._api and self._closed:
                    return _ERR_CALLBACK_FAILURE
                st = self._streams.get(sid)
                if st is not None:
                    self._remote_end(sid, st)
                    self._sink_end(sid)
        elif t == _RST_STREAM:
            self._hdr.pop(sid, None)
            st = self._drop(sid)
            self.stats.rx_reset += 1
            if st is not None:
                code = a
                self.sink.on_stream_reset(
                    sid,
                    ResetReason.REMOTE_REFUSED
                    if code == REFUSED_STREAM
                    else ResetReason.REMOTE_RESET,
                )
                self._premature_reset(st)
        elif t == _SETTINGS:
            if not flags & _ACK:
                self.peer_settings_received = True
                # applied by nghttp2 before this callback; read here once, not per request
                self._peer_streams = int(
                    self._lib.nghttp2_session_get_remote_settings(self._session, 3)
                )
        elif t == _GOAWAY:
            self._on_goaway(b, a)
        return 0

    def _data_frame(self, sid: int, data: bytes, end: int) -> int:
        """The compiled extension: a DATA frame's payload and its END_STREAM in one call.
        Returns 1 when the stream is forgotten here (its close then needs no call)."""
        if data:
            self._data(sid, data)
        if end and self._fatal is None:
            st = self._streams.get(sid)
            if st is not None:
                self._remote_end(sid, st)
                self._sink_end(sid)
        return 0 if sid in self._streams else 1

    def _data(self, sid: int, data: bytes) -> None:
        st = self._streams.get(sid)
        if st is None or self._fatal is not None:
            self._lib.nghttp2_session_consume(self._session, sid, len(data))
            return
        self._sink_data(sid, data)

    def _stream_closed(self, sid: int, code: int) -> None:
        self._hdr.pop(sid, None)
        self._prd.discard(sid)
        st = self._streams.pop(sid, None)
        if st is None or (st.local_done and st.remote_done):
            return
        # nghttp2 reset it (content-length mismatch, a stream error...)
        self.sink.on_stream_reset(
            sid, ResetReason.PROTOCOL_ERROR if code else ResetReason.CONNECTION_TERMINATION
        )

    def _read(self, sid: int, buf: Any, length: int, flags: Any) -> int:
        st = self._streams.get(sid)
        if st is None:
            self._prd.discard(sid)
            flags[0] = _DATA_FLAG_EOF
            return 0
        pending = st.pending
        n = min(length, len(pending))
        if n:
            self._ffi.memmove(buf, pending, n)
            del pending[:n]
        if not pending:
            if st.blocked:
                st.blocked = False
                self._unblocked.append(sid)  # told once this send is over
            if st.trailers is None and not st.end:
                if not n:
                    st.deferred = True  # until send_data / send_trailers resume it
                    return _ERR_DEFERRED
            else:
                st.prd = False
                self._prd.discard(sid)
                if st.trailers is not None:
                    flags[0] = _DATA_FLAG_EOF | _DATA_FLAG_NO_END_STREAM
                    trailers, st.trailers = st.trailers, None
                    self._submit(_SUBMIT_TRAILER, sid, trailers, False)
                else:
                    flags[0] = _DATA_FLAG_EOF
                self._local_end(sid, st)
        self._data_frames_out += 1
        return n

    # ------------------------------------------------------------------ internals

    def _provider(self, sid: int, st: _Stream) -> None:
        """``sid`` gets a data provider (``_submit(..., with_data=True)``): it reads
        ``st.pending`` and defers while it is empty (``send_data`` / ``send_trailers`` resume
        it); END_STREAM goes on the last DATA frame unless trailers follow."""
        st.prd = True
        self._prd.add(sid)

    def _submit_head(self, sid: int, st: _Stream) -> None:
        """Submit the waiting response head with a data provider (its body streams)."""
        blob = st.head or b""
        st.head = None
        self._provider(sid, st)
        rv = int(self._lib.dk_submit(self._session, _SUBMIT_RESPONSE, sid, blob, len(blob), True))
        if rv < 0:
            self._drop(sid)  # the client reset the stream meanwhile

    def _submit_body(self, sid: int, st: _Stream, body: bytes) -> None:
        """Submit the waiting response head with its whole body, sent from C: no data
        provider, and no close callback when the request had ended already."""
        blob = st.head or b""
        st.head = None
        st.pending = bytearray()
        rv = int(
            self._lib.dk_submit_body(
                self._session, self._ctx, sid, blob, len(blob), body, len(body), st.remote_done
            )
        )
        if rv < 0:
            self._drop(sid)
            return
        if body:
            self._data_frames_out += 1 + len(body) // 16_384
        st.end = True
        self._local_end(sid, st)

    def _submit(self, kind: int, sid: int, pairs: HeaderList, with_data: bool) -> int:
        """Submit a header block (``_SUBMIT_*``); a request returns its stream id."""
        session = self._session
        if self._api:
            if not pairs:
                blob = b""
            else:
                blob = b"\0".join([b for pair in pairs for b in pair]) + b"\0"
                if blob.count(b"\0") != 2 * len(pairs):
                    # a NUL in a name or value: malformed in HTTP/2 (RFC 9113 8.2.1), and the
                    # blob could not carry it; such a field is not sent
                    pairs = [(n, v) for n, v in pairs if b"\0" not in n and b"\0" not in v]
                    return self._submit(kind, sid, pairs, with_data)
            return int(self._lib.dk_submit(session, kind, sid, blob, len(blob), with_data))
        lib = self._lib
        NULL = self._ffi.NULL
        # the blob and the nv array must live until submit copied them: held by self (compiled
        # code drops an unused local at once, not at return)
        self._nva_keep, nva, n = _nva(pairs)
        prd = NULL
        if with_data:
            prd = _B.newp(_T["nghttp2_data_provider *"], None)
            prd.read_callback = _read_cb
        if kind == _SUBMIT_RESPONSE:
            return int(lib.nghttp2_submit_response(session, sid, nva, n, prd))
        if kind == _SUBMIT_REQUEST:
            return int(lib.nghttp2_submit_request(session, NULL, nva, n, prd, NULL))
        if kind == _SUBMIT_HEADERS:
            return int(lib.nghttp2_submit_headers(session, 0, sid, NULL, nva, n, NULL))
        return int(lib.nghttp2_submit_trailer(session, sid, nva, n))

    def _local_end(self, sid: int, st: _Stream) -> None:
        st.local_done = True
        if st.remote_done and not st.prd:
            self._drop(sid)

    def _remote_end(self, sid: int, st: _Stream) -> None:
        st.remote_done = True
        if st.local_done and not st.prd and not st.trailers:
            self._drop(sid)

    def _drop(self, sid: int) -> _Stream | None:
        self._prd.discard(sid)
        return self._streams.pop(sid, None)

    def _reset_wire(self, sid: int, code: int) -> None:
        if self._lib.nghttp2_submit_rst_stream(self._session, 0, sid, code) == 0:
            self.stats.tx_reset += 1

    def _fail(self, code: int, message: str, queue: bool = True) -> None:
        if not self._closed:
            if queue:
                # built here, and nghttp2's queue is dropped: what it queued for the offending
                # frame (RST_STREAM of a stream the peer may not consider open) is not sent
                last = int(self._lib.nghttp2_session_get_last_proc_stream_id(self._session))
                opaque = message.encode()[:256]
                payload = last.to_bytes(4, "big") + code.to_bytes(4, "big") + opaque
                self._dead = (
                    len(payload).to_bytes(3, "big") + bytes([_GOAWAY, 0]) + bytes(4) + payload
                )
            self.stats.goaway_sent += 1
        self._closed = True
        for sid in list(self._streams):
            self._drop(sid)
            self.sink.on_stream_reset(sid, ResetReason.CONNECTION_TERMINATION)
        raise CodecError(400, f"HTTP/2 connection error {_code_name(code)}: {message}")

    def _premature_reset(self, st: _Stream) -> None:
        if self._client:
            return  # upstream resets are the upstream's business
        if self._clock() - st.opened_at >= self.options.premature_reset_min_stream_lifetime:
            return
        self._premature += 1
        self.stats.premature_resets += 1
        o = self.options
        if (
            self._streams_opened >= o.premature_reset_total_stream_count
            and self._premature * 2 >= self._streams_opened
        ):
            self.stats.rapid_reset_goaway += 1
            raise _Flood(
                ENHANCE_YOUR_CALM,
                f"rapid reset: {self._premature} of {self._streams_opened} streams reset "
                f"within {o.premature_reset_min_stream_lifetime:g}s of opening",
            )

    def _on_goaway(self, last: int, code: int) -> None:
        self.goaway_received = True
        self.last_stream_id_from_peer = last
        ours = self._client
        for sid in sorted(self._streams):
            if (ours and sid > last) or code != NO_ERROR:
                self._drop(sid)
                self.sink.on_stream_reset(
                    sid,
                    ResetReason.REMOTE_REFUSED
                    if ours and sid > last and code == NO_ERROR
                    else ResetReason.CONNECTION_TERMINATION,
                )

    # the two sides
    def _headers(self, sid: int, st: _Stream, cat: int, raw: HeaderList | None, end: bool) -> None:
        """A header block: as ``raw`` pairs, or (``raw`` None) as ``self._block_in``."""
        raise NotImplementedError

    def _raw(self, raw: HeaderList | None) -> HeaderList:
        """The pairs of a header block (``_headers``' ``raw``, or the block split)."""
        if raw is not None:
            return raw
        block, self._block_in = self._block_in, None
        return _split_block(block or b"")

    def _sink_data(self, sid: int, data: bytes) -> None:
        raise NotImplementedError

    def _sink_end(self, sid: int) -> None:
        raise NotImplementedError


def _split_block(block: bytes) -> HeaderList:
    """``name\0value\0...`` as ``(name, value)`` pairs."""
    parts = block.split(b"\0")
    return list(zip(parts[::2], parts[1::2], strict=False))  # parts ends with b""


def _goaway_in(chunks: list[bytes]) -> tuple[int, str]:
    """The error code and debug data of the last GOAWAY frame in ``chunks``."""
    data = b"".join(chunks)
    found = (PROTOCOL_ERROR, "")
    i = 0
    while i + 9 <= len(data):
        n = int.from_bytes(data[i : i + 3], "big")
        if data[i + 3] == _GOAWAY and n >= 8:
            p = data[i + 9 : i + 9 + n]
            found = (int.from_bytes(p[4:8], "big"), p[8:].decode("latin-1"))
        i += 9 + n
    return found


def _response_list(head: ResponseHead) -> HeaderList:
    pairs: HeaderList = [(b":status", str(head.status).encode())]
    pairs += lower_pairs(head.pairs())
    return pairs


def _code_name(code: int) -> str:
    return _CODE_NAMES.get(code, str(code))


# ---------------------------------------------------------------------------------- server


class NgHttp2ServerCodec(_NgCodec):
    """Downstream side on libnghttp2 (same contract as ``http2.Http2ServerCodec``)."""

    def __init__(
        self,
        sink: ServerSink,
        options: Http2Options = DEFAULT_OPTIONS,
        stats: Http2Stats | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(False, options, stats, clock)
        self.sink = sink
        # the sink when it is the HTTP/2 downstream connection (it sets this): compiled, the
        # request events are native calls instead of generic ones through ServerSink
        self.h2conn: Http2Connection | None = None

    def _headers(self, sid: int, st: _Stream, cat: int, raw: HeaderList | None, end: bool) -> None:
        if cat != _HCAT_REQUEST:
            pairs = self._raw(raw)
            if sid in self._streams:  # trailers
                self.stats.trailers += 1
                self.sink.on_request_trailers(sid, pairs)
            return
        self._streams_opened += 1
        if st.rejected:
            self._block_in = None
            self.stats.header_overflow += 1
            self._reset_wire(sid, PROTOCOL_ERROR)
            self._premature_reset(st)
            return
        block, self._block_in = self._block_in, None
        if block is not None:  # name\0value\0...: one decode for the whole head
            parts = block.decode("latin-1").split("\0")  # ends with "" (the block ends with NUL)
        else:
            parts = []
            for n, v in raw or ():
                parts.append(n.decode("latin-1"))
                parts.append(v.decode("latin-1"))
            parts.append("")
        nf = len(parts) - 1
        method = path = authority = ""
        scheme = "http"
        i = 0
        while i < nf:  # pseudo-headers come first (nghttp2 rejects a block where they do not)
            name = parts[i]
            if not name.startswith(":"):
                break
            value = parts[i + 1]
            if name == ":method":
                method = value
            elif name == ":path":
                path = value
            elif name == ":authority":
                authority = value
            elif name == ":scheme":
                scheme = value
            i += 2
        headers: dict[str, str] = {}
        while i < nf:
            name = parts[i]
            prev = headers.get(name)
            if prev is None:
                headers[name] = parts[i + 1]
            else:  # a repeated field: one value, joined as HTTP/1.1's
                headers[name] = prev + ("; " if name == "cookie" else ", ") + parts[i + 1]
            i += 2
        head = RequestHead(headers)
        head.version = "2"
        head.method = method or "GET"
        head.path = path or "/"
        head.scheme = scheme
        st.headers = []
        if not authority:
            authority = headers.get("host", "")
        head.authority = authority
        headers["host"] = authority
        cl = headers.get("content-length")
        if cl is not None:
            head.content_length = int(cl)  # nghttp2 checked it is a number
        head.has_body = not end
        self._streams[sid] = st
        c = self.h2conn
        if c is not None:  # compiled: a native call
            c.on_request_headers(sid, head)
        else:
            self.sink.on_request_headers(sid, head)

    def send_headers(self, sid: int, head: ResponseHead, end_stream: bool = False) -> None:
        st = self._streams.get(sid)
        if st is None or st.local_done or self._closed:
            return
        blob = b""
        if self._api:
            blob, n = response_header_block(head.status, head.pairs())
            if blob.count(b"\0") != 2 * n:  # a NUL in a field: _submit leaves that field out
                blob = b""
            elif not end_stream:
                st.head = blob  # goes out with its body (send_data) or at the next _pull
                self._unsent.append(sid)
                return
        if not end_stream:
            self._provider(sid, st)
        if blob:
            rv = int(
                self._lib.dk_submit(
                    self._session, _SUBMIT_RESPONSE, sid, blob, len(blob), not end_stream
                )  # fmt: skip
            )
        else:
            rv = self._submit(_SUBMIT_RESPONSE, sid, _response_list(head), not end_stream)
        if rv < 0:
            self._drop(sid)  # the client reset the stream meanwhile
            return
        if end_stream:
            self._local_end(sid, st)

    def send_continue(self, sid: int) -> None:
        if sid in self._streams:
            self._submit(_SUBMIT_HEADERS, sid, [(b":status", b"100")], False)

    def drain(self) -> None:
        self.goaway(0)

    @property
    def reusable(self) -> bool:
        return not self.closed

    def _sink_data(self, sid: int, data: bytes) -> None:
        c = self.h2conn
        if c is not None:  # compiled: a native call
            c.on_request_data(sid, data)
        else:
            self.sink.on_request_data(sid, data)

    def _sink_end(self, sid: int) -> None:
        c = self.h2conn
        if c is not None:  # compiled: a native call
            c.on_request_end(sid)
        else:
            self.sink.on_request_end(sid)


# ---------------------------------------------------------------------------------- client


class NgHttp2ClientCodec(_NgCodec):
    """Upstream side on libnghttp2 (same contract as ``http2.Http2ClientCodec``)."""

    def __init__(
        self,
        sink: ClientSink,
        options: Http2Options = DEFAULT_OPTIONS,
        stats: Http2Stats | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(True, options, stats, clock)
        self.sink = sink
        # the sink when it is a pooled HTTP/2 upstream connection (it sets this): compiled,
        # the response events are native calls instead of generic ones through ClientSink
        self.h2conn: H2UpstreamConnection | None = None
        self._stream_cap = _BIG  # set here: mypyc compiles no class-level default from a name
        self._no_new_streams = False

    @property
    def max_concurrent_streams(self) -> int:
        return min(self._peer_streams, self._stream_cap)

    @max_concurrent_streams.setter
    def max_concurrent_streams(self, value: int) -> None:
        self._stream_cap = value

    @property
    def keep_alive(self) -> bool:
        return not (self.closed or self._no_new_streams)

    @keep_alive.setter
    def keep_alive(self, value: bool) -> None:
        self._no_new_streams = not value

    def new_stream(self) -> int:
        return int(self._lib.nghttp2_session_get_next_stream_id(self._session))

    def send_headers(self, sid: int, head: RequestHead, end_stream: bool = False) -> None:
        if self.closed:
            raise CodecError(503, "HTTP/2 upstream connection is closing (GOAWAY)")
        if (
            not end_stream
            and head.version == "2"
            and not head.has_body
            and head.method != "CONNECT"
        ):
            # the downstream HEADERS carried END_STREAM (an HTTP/2 codec decoded this head): so
            # do ours, instead of an empty DATA frame with END_STREAM once the stream hears the
            # end (its send_data(b"", True) finds the stream done and sends nothing)
            end_stream = True
        st = _Stream(self._clock())
        if not end_stream:
            self._provider(sid, st)
        if self._api:
            blob, n = request_header_block(head)
            if blob.count(b"\0") == 2 * n:
                got = int(
                    self._lib.dk_submit(
                        self._session, _SUBMIT_REQUEST, sid, blob, len(blob), not end_stream
                    )  # fmt: skip
                )
            else:  # a NUL in a field: _submit leaves that field out
                got = self._submit(_SUBMIT_REQUEST, sid, request_header_list(head), not end_stream)
        else:
            got = self._submit(_SUBMIT_REQUEST, sid, request_header_list(head), not end_stream)
        if got != sid:
            self._prd.discard(sid)
            raise CodecError(503, f"HTTP/2 upstream stream not opened (got {got} for {sid})")
        self._streams[sid] = st
        self._streams_opened += 1
        if end_stream:
            self._local_end(sid, st)

    def _headers(self, sid: int, st: _Stream, cat: int, raw: HeaderList | None, end: bool) -> None:
        if sid not in self._streams:
            self._block_in = None
            return
        if raw is None:
            block = self._block_in or b""
            if block.startswith(b":status\0"):  # nghttp2 checked: pseudo-headers come first
                self._block_in = None
                self._response_block(sid, st, block)
                return
            raw = self._raw(None)
        if raw and raw[0][0] == b":status" or any(n == b":status" for n, _ in raw):
            status = 0
            pairs: HeaderList = []
            has_cl = False
            for n, v in raw:
                if n[:1] == b":":
                    if n == b":status":
                        status = int(v)
                    continue
                if n == b"content-length":
                    has_cl = True
                pairs.append((n, v))
            st.headers = []
            if 100 <= status < 200:
                return  # informational: the final head follows
            self.sink.on_response_headers(sid, ResponseHead(status, pairs, None, has_cl))
            return
        self.stats.trailers += 1
        st.headers = []
        self.sink.on_response_trailers(sid, raw)

    def _response_block(self, sid: int, st: _Stream, block: bytes) -> None:
        """A response head from the extension's block: ``:status`` first, then the regular
        fields (nghttp2 rejects any other pseudo-header in a response)."""
        parts = block.split(b"\0")
        status = int(parts[1])
        if 100 <= status < 200:
            return  # informational: the final head follows
        nf = len(parts) - 1  # the block ends with NUL: the last part is b""
        pairs: HeaderList = []
        has_cl = False
        i = 2
        while i < nf:
            name = parts[i]
            if name == b"content-length":
                has_cl = True
            pairs.append((name, parts[i + 1]))
            i += 2
        head = ResponseHead(status, pairs, None, has_cl)
        c = self.h2conn
        if c is not None:  # compiled: a native call
            c.on_response_headers(sid, head)
        else:
            self.sink.on_response_headers(sid, head)

    def _sink_data(self, sid: int, data: bytes) -> None:
        c = self.h2conn
        if c is not None:  # compiled: a native call
            c.on_response_data(sid, data)
        else:
            self.sink.on_response_data(sid, data)

    def _sink_end(self, sid: int) -> None:
        c = self.h2conn
        if c is not None:  # compiled: a native call
            c.on_response_end(sid)
        else:
            self.sink.on_response_end(sid)


if TYPE_CHECKING:

    def _server(s: ServerSink) -> ServerCodec:
        return NgHttp2ServerCodec(s)

    def _client(c: ClientSink) -> ClientCodec:
        return NgHttp2ClientCodec(c)
