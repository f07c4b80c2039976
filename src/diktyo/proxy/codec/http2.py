"""HTTP/2 codec on the `h2` library: server and client side, with Envoy's flood protections.

Theory of operation
-------------------
Sans-I/O, like the HTTP/1.1 codec: the connection that owns a codec ``feed``\\ s it the bytes it
read and writes what ``data_to_send()`` returns; decoded input becomes calls on the sink
(``codec/events.py`` has the contract). `h2` does the framing, HPACK, the stream state machine
and flow-control bookkeeping; this module adds what `h2` leaves to its user:

Frames are inspected one by one before `h2` acts on them (``_H2Codec.feed``), so per-frame
limits apply as Envoy applies them (``Http2Options`` holds Envoy's names and defaults):

- **concurrent streams**: SETTINGS_MAX_CONCURRENT_STREAMS is advertised; a stream beyond it is
  refused with RST_STREAM(REFUSED_STREAM) (as nghttp2 does), never forwarded.
- **header list size**: SETTINGS_MAX_HEADER_LIST_SIZE and `hpack`'s decoder bound the decoded
  list (60 KiB, Envoy's ``max_request_headers_kb``); the compressed block that HEADERS +
  CONTINUATION frames accumulate is bounded too (a **CONTINUATION flood** ends in GOAWAY before
  anything is decoded); more than ``max_headers_count`` fields reset the stream.
- **rapid reset** (CVE-2023-44487): streams reset by the peer (or refused / errored by us)
  within ``premature_reset_min_stream_lifetime`` of opening are premature; once a connection
  has opened ``premature_reset_total_stream_count`` streams and half of them were premature,
  it is closed with GOAWAY(ENHANCE_YOUR_CALM), as Envoy 1.27.1+ does.
- **SETTINGS / PING floods**: each acknowledgement the peer makes us queue is an outbound
  control frame; more than ``max_outbound_control_frames`` queued while the transport has not
  drained them (``data_to_send`` with writing not paused) closes the connection.
- **empty frames, PRIORITY, WINDOW_UPDATE floods**: Envoy's three other inbound limits.
- **malformed frames and messages** (bad padding, frames on the wrong stream, illegal or
  upper-case header names, connection-specific headers, missing pseudo-headers...): `h2`
  raises; the codec queues GOAWAY with the error code and raises ``CodecError``. Nothing of
  such a stream reaches the sink, so it is never forwarded (Envoy's default
  ``stream_error_on_invalid_http_messaging: false`` also closes the connection).

Flow control both ways. Inbound: received DATA is credited back (WINDOW_UPDATE) only when the
consumer calls ``acknowledge(sid, n)``, i.e. when it has passed the bytes on; a stream whose
consumer is slow therefore stops the peer at its window (64 KiB per stream, 1 MiB per
connection: Envoy's edge recommendation), and ``pause_reading`` withholds credit even for
acknowledged bytes. Outbound: ``send_data`` sends what the peer's window allows and keeps the
rest on the stream; the sink hears ``on_send_blocked`` (pause the source) and, once the window
reopened and the buffer went out, ``on_send_unblocked``. What a stream buffers is therefore
bounded by what its source produced before it was paused.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.frame_buffer
import h2.settings
import hyperframe.exceptions as hfe
import hyperframe.frame as hf

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
from diktyo.proxy.codec.http2_common import DEFAULT_OPTIONS as DEFAULT_OPTIONS
from diktyo.proxy.codec.http2_common import PREFACE as PREFACE
from diktyo.proxy.codec.http2_common import Http2Options as Http2Options
from diktyo.proxy.codec.http2_common import Http2Stats as Http2Stats
from diktyo.proxy.codec.http2_common import (
    _lower,
    request_header_list,
)

ErrorCodes = h2.errors.ErrorCodes
_BIG = 2**31 - 1
# sending on a stream the peer has reset (a race the proxy cannot avoid) is not an error here
_SEND_ERRORS = (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError)
_RESET_CODES: dict[ResetReason, ErrorCodes] = {
    ResetReason.LOCAL_RESET: ErrorCodes.CANCEL,
    ResetReason.LOCAL_REFUSED: ErrorCodes.REFUSED_STREAM,
    ResetReason.REMOTE_RESET: ErrorCodes.CANCEL,
    ResetReason.REMOTE_REFUSED: ErrorCodes.REFUSED_STREAM,
    ResetReason.CONNECTION_FAILURE: ErrorCodes.CONNECT_ERROR,
    ResetReason.CONNECTION_TERMINATION: ErrorCodes.CANCEL,
    ResetReason.OVERFLOW: ErrorCodes.REFUSED_STREAM,
    ResetReason.PROTOCOL_ERROR: ErrorCodes.PROTOCOL_ERROR,
}


class _Flood(Exception):
    """An inbound limit tripped: the connection is closed with ``code``."""

    def __init__(self, code: ErrorCodes, message: str) -> None:
        super().__init__(message)
        self.code = code


class _GuardedFrameBuffer(h2.frame_buffer.FrameBuffer):
    """`h2`'s frame buffer, plus a bound on the header block that HEADERS + CONTINUATION frames
    accumulate (`h2` alone allows 64 frames of up to 16 MiB each) and a count of empty
    CONTINUATION frames."""

    def __init__(self, server: bool, max_block: int, on_empty: Callable[[], None]) -> None:
        super().__init__(server=server)
        self._max_block = max_block
        self._on_empty = on_empty

    def _update_header_buffer(self, f: hf.Frame | None) -> hf.Frame | None:
        if self._headers_buffer and isinstance(f, hf.ContinuationFrame):
            size = sum(len(x.data) for x in self._headers_buffer) + len(f.data)
            if size > self._max_block:
                raise _Flood(
                    ErrorCodes.ENHANCE_YOUR_CALM,
                    f"header block of {size} bytes across {len(self._headers_buffer) + 1} "
                    f"HEADERS/CONTINUATION frames exceeds {self._max_block} bytes",
                )
            if not f.data and "END_HEADERS" not in f.flags:
                self._on_empty()
        return super()._update_header_buffer(f)


class _ServerSettings(h2.settings.Settings):
    """Advertises our stream limit but lets `h2` admit one more stream, so that the codec can
    refuse it with RST_STREAM(REFUSED_STREAM) after HPACK-decoding it (`h2` would raise before
    decoding and leave the HPACK table out of step with the peer's)."""

    @property  # type: ignore[misc]  # read-only on purpose: see the class docstring
    def max_concurrent_streams(self) -> int:
        return _BIG


@dataclass(slots=True)
class _Stream:
    opened_at: float
    pending: bytearray = field(default_factory=bytearray)
    pending_end: bool = False
    pending_trailers: HeaderList | None = None
    blocked: bool = False
    paused: bool = False
    owed: int = 0  # acknowledged bytes withheld while paused
    local_done: bool = False
    remote_done: bool = False


class _H2Codec:
    protocol = "HTTP/2"
    multiplexed = True

    sink: ServerSink | ClientSink  # set by the subclass

    def __init__(
        self,
        client_side: bool,
        options: Http2Options,
        stats: Http2Stats | None,
        clock: Callable[[], float],
    ) -> None:
        self.options = options
        self.stats = stats if stats is not None else Http2Stats()
        self._clock = clock
        cfg = h2.config.H2Configuration(
            client_side=client_side,
            header_encoding=None,
            validate_inbound_headers=True,
            normalize_inbound_headers=True,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        conn = h2.connection.H2Connection(cfg)
        initial = {
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: options.max_concurrent_streams,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: options.initial_stream_window_size,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: options.max_header_list_bytes,
        }
        if client_side:
            initial[h2.settings.SettingCodes.ENABLE_PUSH] = 0
            conn.local_settings = h2.settings.Settings(client=True, initial_values=initial)
        else:
            conn.local_settings = _ServerSettings(client=False, initial_values=initial)
        conn.decoder.max_header_list_size = options.max_header_list_bytes
        conn.incoming_buffer = _GuardedFrameBuffer(
            not client_side, options.max_header_list_bytes, self._empty_frame
        )
        conn.initiate_connection()
        extra = options.initial_connection_window_size - 65_535
        if extra > 0:
            conn.increment_flow_control_window(extra)
        self._conn = conn
        self._streams: dict[int, _Stream] = {}
        self._closed = False
        self._draining = False  # a graceful GOAWAY went out: open streams finish
        self._goaway_last = _BIG
        self.goaway_received = False
        self.peer_settings_received = False
        self.last_stream_id_from_peer = _BIG
        # flood accounting
        self._control_queued = 0
        self._write_paused = False
        self._empty_run = 0
        self._window_updates_in = 0
        self._data_frames_out = 0
        self._streams_opened = 0
        self._premature = 0
        self._priority_in = 0

    # ------------------------------------------------------------------ shared API

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    @property
    def closed(self) -> bool:
        """A GOAWAY was sent or received, or the connection failed: open no new stream."""
        return self._closed or self.goaway_received or self._draining

    def data_to_send(self) -> bytes:
        if not self._write_paused:
            self._control_queued = 0
        return self._conn.data_to_send()

    def set_write_paused(self, paused: bool) -> None:
        """The transport's write buffer is full (``pause_writing``) or drained again: control
        frames queued meanwhile count towards ``max_outbound_control_frames``."""
        self._write_paused = paused

    def feed(self, data: bytes) -> None:
        if self._closed:
            return
        conn = self._conn
        try:
            conn.incoming_buffer.add_data(data)
            conn.incoming_buffer.max_frame_size = conn.max_inbound_frame_size
            for frame in conn.incoming_buffer:
                self._inspect(frame)
                if type(frame) is hf.GoAwayFrame and frame.error_code == 0:
                    # a graceful GOAWAY: `h2` would close its state machine and refuse the
                    # frames of the streams still in flight; take it here instead
                    self._on_goaway(frame)
                    continue
                events = conn._receive_frame(frame)
                if events:
                    self._dispatch(events)
        except _Flood as e:
            self._fail(e.code, str(e))
        except h2.exceptions.DenialOfServiceError as e:
            self.stats.header_overflow += 1
            self._fail(ErrorCodes.ENHANCE_YOUR_CALM, f"header list too large: {e}")
        except hfe.InvalidPaddingError:
            self._fail(ErrorCodes.PROTOCOL_ERROR, "frame with invalid padding")
        except h2.exceptions.FrameTooLargeError as e:
            self._fail(ErrorCodes.FRAME_SIZE_ERROR, str(e))
        except h2.exceptions.ProtocolError as e:
            self.stats.rx_messaging_error += 1
            self._fail(e.error_code or ErrorCodes.PROTOCOL_ERROR, str(e) or type(e).__name__)
        except (ValueError, hfe.HyperframeError) as e:  # hyperframe parse errors
            self._fail(ErrorCodes.PROTOCOL_ERROR, f"malformed frame: {e}")

    def eof(self) -> None:
        self._closed = True
        for sid in list(self._streams):
            self._drop(sid)
            self._sink_reset(sid, ResetReason.CONNECTION_TERMINATION)

    def send_data(self, sid: int, data: bytes, end_stream: bool = False) -> None:
        st = self._streams.get(sid)
        if st is None or st.local_done:
            return
        if st.pending:
            st.pending += data
            st.pending_end = st.pending_end or end_stream
            return
        self._send_window(sid, st, data, end_stream)

    def send_trailers(self, sid: int, trailers: HeaderList) -> None:
        st = self._streams.get(sid)
        if st is None or st.local_done:
            return
        if st.pending:
            st.pending_trailers = trailers
            st.pending_end = True
            return
        try:
            self._conn.send_headers(sid, _lower(trailers), end_stream=True)
        except _SEND_ERRORS:
            self._drop(sid)  # the peer reset the stream meanwhile: nothing to send
            return
        self._local_end(sid, st)

    def send_reset(self, sid: int, reason: ResetReason) -> None:
        if sid not in self._streams:
            return
        self._drop(sid)
        self._reset_wire(sid, _RESET_CODES.get(reason, ErrorCodes.CANCEL))

    def acknowledge(self, sid: int, n: int) -> None:
        st = self._streams.get(sid)
        if st is None:
            return
        if st.paused:
            st.owed += n
            return
        self._credit(sid, n)

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
                self._credit(sid, n)

    def goaway(self, error_code: int = 0, message: str = "") -> None:
        """Graceful drain (NO_ERROR: GOAWAY naming the last stream taken; open streams go on,
        later ones are refused) or a connection error (GOAWAY with the code; nothing more)."""
        if self._closed or (error_code == 0 and self._draining):
            return
        self.stats.goaway_sent += 1
        if error_code == 0:
            # h2's close_connection() would also forbid sending on the open streams
            f = hf.GoAwayFrame(0)
            f.last_stream_id = self._goaway_last = int(self._conn.highest_inbound_stream_id)
            f.error_code = 0
            if message:
                f.additional_data = message.encode()[:256]
            self._conn._prepare_for_sending([f])
            self._draining = True
            return
        self._conn.close_connection(error_code, additional_data=message.encode()[:256] or None)
        self._closed = True

    # ------------------------------------------------------------------ internals

    def _credit(self, sid: int, n: int) -> None:
        try:
            self._conn.acknowledge_received_data(n, sid)
        except h2.exceptions.StreamClosedError:
            pass

    def _empty_frame(self) -> None:
        self._empty_run += 1
        if self._empty_run > self.options.max_consecutive_inbound_frames_with_empty_payload:
            self.stats.inbound_empty_frames_flood += 1
            raise _Flood(
                ErrorCodes.ENHANCE_YOUR_CALM,
                f"{self._empty_run} consecutive frames with an empty payload (limit "
                f"{self.options.max_consecutive_inbound_frames_with_empty_payload})",
            )

    def _inspect(self, frame: hf.Frame) -> None:
        """Per-frame flood limits, applied before `h2` acts on the frame."""
        t = type(frame)
        o = self.options
        if isinstance(frame, (hf.DataFrame, hf.HeadersFrame)):
            if frame.data or "END_STREAM" in frame.flags:
                self._empty_run = 0
            else:
                self._empty_frame()
        elif t is hf.PingFrame or t is hf.SettingsFrame:
            if "ACK" not in frame.flags:
                self._control_queued += 1
                if self._control_queued > o.max_outbound_control_frames:
                    self.stats.outbound_control_flood += 1
                    raise _Flood(
                        ErrorCodes.ENHANCE_YOUR_CALM,
                        f"{self._control_queued} PING/SETTINGS acknowledgements queued but "
                        f"not written (limit "
                        f"{o.max_outbound_control_frames}): the peer floods and does not read",
                    )
        elif t is hf.WindowUpdateFrame:
            self._window_updates_in += 1
            limit = 5 + 2 * (
                self._streams_opened
                + o.max_inbound_window_update_frames_per_data_frame_sent * self._data_frames_out
            )
            if self._window_updates_in > limit:
                self.stats.inbound_window_update_frames_flood += 1
                raise _Flood(
                    ErrorCodes.ENHANCE_YOUR_CALM,
                    f"{self._window_updates_in} WINDOW_UPDATE frames for "
                    f"{self._data_frames_out} DATA frames sent",
                )
        elif t is hf.PriorityFrame:
            self._priority_in += 1
            limit = o.max_inbound_priority_frames_per_stream * (1 + self._streams_opened)
            if self._priority_in > limit:
                self.stats.inbound_priority_frames_flood += 1
                raise _Flood(
                    ErrorCodes.ENHANCE_YOUR_CALM,
                    f"{self._priority_in} PRIORITY frames for {self._streams_opened} streams "
                    f"(limit {o.max_inbound_priority_frames_per_stream} per stream)",
                )

    def _fail(self, code: int, message: str) -> None:
        if not self._closed:
            try:
                self._conn.close_connection(code, additional_data=message.encode()[:256])
            except h2.exceptions.ProtocolError:
                pass
            self.stats.goaway_sent += 1
        self._closed = True
        for sid in list(self._streams):
            self._drop(sid)
            self._sink_reset(sid, ResetReason.CONNECTION_TERMINATION)
        raise CodecError(400, f"HTTP/2 connection error {_code_name(code)}: {message}")

    def _reset_wire(self, sid: int, code: ErrorCodes) -> None:
        try:
            self._conn.reset_stream(sid, code)
            self.stats.tx_reset += 1
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass

    def _drop(self, sid: int) -> _Stream | None:
        return self._streams.pop(sid, None)

    def _send_window(self, sid: int, st: _Stream, data: bytes, end_stream: bool) -> None:
        conn = self._conn
        view = memoryview(data)
        while view:
            window = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
            if window <= 0:
                st.pending += view
                st.pending_end = st.pending_end or end_stream
                if not st.blocked:
                    st.blocked = True
                    self._sink_blocked(sid)
                return
            chunk, view = view[:window], view[window:]
            try:
                conn.send_data(sid, chunk.tobytes(), end_stream=end_stream and not view)
            except _SEND_ERRORS:
                self._drop(sid)
                return
            self._data_frames_out += 1
        if not data and end_stream:
            try:
                conn.send_data(sid, b"", end_stream=True)
            except _SEND_ERRORS:
                self._drop(sid)
                return
            self._data_frames_out += 1
        if end_stream:
            self._local_end(sid, st)

    def _flush(self, sid: int, st: _Stream) -> None:
        if not st.pending:
            return
        data = bytes(st.pending)
        st.pending.clear()
        end, trailers = st.pending_end, st.pending_trailers
        st.pending_end, st.pending_trailers = False, None
        self._send_window(sid, st, data, end and trailers is None)
        if st.pending:  # still blocked
            st.pending_end = st.pending_end or end
            st.pending_trailers = trailers
            return
        if trailers is not None:
            try:
                self._conn.send_headers(sid, _lower(trailers), end_stream=True)
            except _SEND_ERRORS:
                self._drop(sid)
                return
            self._local_end(sid, st)
        if st.blocked:
            st.blocked = False
            self._sink_unblocked(sid)

    def _local_end(self, sid: int, st: _Stream) -> None:
        st.local_done = True
        if st.remote_done:
            self._drop(sid)

    def _remote_end(self, sid: int, st: _Stream) -> None:
        st.remote_done = True
        if st.local_done:
            self._drop(sid)

    def _premature_reset(self, st: _Stream) -> None:
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
                ErrorCodes.ENHANCE_YOUR_CALM,
                f"rapid reset: {self._premature} of {self._streams_opened} streams reset "
                f"within {o.premature_reset_min_stream_lifetime:g}s of opening",
            )

    def _dispatch(self, events: list[Any]) -> None:
        E = h2.events
        for ev in events:
            t = type(ev)
            if t is E.DataReceived:
                sid = ev.stream_id
                st = self._streams.get(sid)
                padding = ev.flow_controlled_length - len(ev.data)
                if st is None:  # refused or reset stream: hand the window back at once
                    self._credit(sid, ev.flow_controlled_length)
                    continue
                if padding:
                    self._credit(sid, padding)
                if ev.data:
                    self._sink_data(sid, ev.data)
            elif t is E.StreamEnded:
                st = self._streams.get(ev.stream_id)
                if st is not None:
                    self._remote_end(ev.stream_id, st)
                    self._sink_end(ev.stream_id)
            elif t is E.TrailersReceived:
                if ev.stream_id in self._streams:
                    self.stats.trailers += 1
                    self._sink_trailers(ev.stream_id, list(ev.headers))
            elif t is E.WindowUpdated:
                if ev.stream_id:
                    st = self._streams.get(ev.stream_id)
                    if st is not None and st.pending:
                        self._flush(ev.stream_id, st)
                else:
                    for sid, st in list(self._streams.items()):
                        if st.pending:
                            self._flush(sid, st)
            elif t is E.RemoteSettingsChanged:
                self.peer_settings_received = True
                if h2.settings.SettingCodes.INITIAL_WINDOW_SIZE in ev.changed_settings:
                    for sid, st in list(self._streams.items()):
                        if st.pending:
                            self._flush(sid, st)
            elif t is E.StreamReset:
                sid = ev.stream_id
                st = self._drop(sid)
                if ev.remote_reset:
                    self.stats.rx_reset += 1
                if st is None:
                    continue
                if ev.remote_reset:
                    reason = (
                        ResetReason.REMOTE_REFUSED
                        if ev.error_code == ErrorCodes.REFUSED_STREAM
                        else ResetReason.REMOTE_RESET
                    )
                else:
                    reason = ResetReason.PROTOCOL_ERROR
                self._sink_reset(sid, reason)
                self._premature_reset(st)
            elif t is E.ConnectionTerminated:
                self._on_goaway(ev)
            else:
                self._other_event(ev)

    def _on_goaway(self, ev: Any) -> None:
        """GOAWAY from the peer (an h2 event, or the frame itself when graceful): no new
        stream; on the client side, streams above ``last_stream_id`` were not processed
        (REMOTE_REFUSED: safe to retry); an error code ends every stream."""
        self.goaway_received = True
        last = ev.last_stream_id if ev.last_stream_id is not None else _BIG
        self.last_stream_id_from_peer = last
        ours = bool(self._conn.config.client_side)  # a server's streams are the client's
        for sid in sorted(self._streams):
            if (ours and sid > last) or ev.error_code != ErrorCodes.NO_ERROR:
                self._drop(sid)
                self._sink_reset(
                    sid,
                    ResetReason.REMOTE_REFUSED
                    if ours and sid > last and ev.error_code == ErrorCodes.NO_ERROR
                    else ResetReason.CONNECTION_TERMINATION,
                )

    # hooks for the two sides
    def _other_event(self, ev: Any) -> None:
        pass

    def _sink_data(self, sid: int, data: bytes) -> None:
        raise NotImplementedError

    def _sink_end(self, sid: int) -> None:
        raise NotImplementedError

    def _sink_trailers(self, sid: int, trailers: HeaderList) -> None:
        raise NotImplementedError

    # the same on both sides (``sink`` is the subclass's ServerSink or ClientSink)
    def _sink_reset(self, sid: int, reason: ResetReason) -> None:
        self.sink.on_stream_reset(sid, reason)

    def _sink_blocked(self, sid: int) -> None:
        self.sink.on_send_blocked(sid)

    def _sink_unblocked(self, sid: int) -> None:
        self.sink.on_send_unblocked(sid)


def _code_name(code: int) -> str:
    try:
        return ErrorCodes(code).name
    except ValueError:
        return str(code)


# ---------------------------------------------------------------------------------- server


class Http2ServerCodec(_H2Codec):
    """Downstream side: HTTP/2 requests in (prior knowledge or after ALPN ``h2``), responses out."""

    sink: ServerSink

    def __init__(
        self,
        sink: ServerSink,
        options: Http2Options = DEFAULT_OPTIONS,
        stats: Http2Stats | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(False, options, stats, clock)
        self.sink = sink

    def _other_event(self, ev: Any) -> None:
        if type(ev) is h2.events.RequestReceived:
            self._on_request(ev)

    def _on_request(self, ev: Any) -> None:
        sid = ev.stream_id
        self._streams_opened += 1
        st = _Stream(self._clock())
        o = self.options
        if self._draining and sid > self._goaway_last:
            self._reset_wire(sid, ErrorCodes.REFUSED_STREAM)  # after our GOAWAY: not processed
            return
        if len(self._streams) >= o.max_concurrent_streams:
            self.stats.streams_refused += 1
            self._reset_wire(sid, ErrorCodes.REFUSED_STREAM)
            self._premature_reset(st)
            return
        raw = ev.headers
        if len(raw) > o.max_headers_count + 4:
            regular = sum(1 for n, _ in raw if not n.startswith(b":"))
            if regular > o.max_headers_count:
                self.stats.header_overflow += 1
                self._reset_wire(sid, ErrorCodes.PROTOCOL_ERROR)
                self._premature_reset(st)
                return
        head = RequestHead()
        head.version = "2"
        headers = head.headers
        authority = ""
        for n, v in raw:
            name = n.decode("latin-1")
            value = v.decode("latin-1")
            if name[0] == ":":
                if name == ":method":
                    head.method = value
                elif name == ":path":
                    head.path = value
                elif name == ":authority":
                    authority = value
                elif name == ":scheme":
                    head.scheme = value
                continue
            if name in headers:
                headers[name] += ("; " if name == "cookie" else ", ") + value
            else:
                headers[name] = value
        if not authority:
            authority = headers.get("host", "")
        head.authority = authority
        headers["host"] = authority
        cl = headers.get("content-length")
        if cl is not None:
            try:
                head.content_length = int(cl)
            except ValueError:
                self.stats.rx_messaging_error += 1
                self._reset_wire(sid, ErrorCodes.PROTOCOL_ERROR)
                self._premature_reset(st)
                return
        head.has_body = not ev.stream_ended
        self._streams[sid] = st
        self.sink.on_request_headers(sid, head)
        # h2 reports END_STREAM on HEADERS as a separate StreamEnded event, which follows

    def send_headers(self, sid: int, head: ResponseHead, end_stream: bool = False) -> None:
        st = self._streams.get(sid)
        if st is None or st.local_done:
            return
        pairs: HeaderList = [(b":status", str(head.status).encode())]
        pairs += _lower(head.pairs())
        try:
            self._conn.send_headers(sid, pairs, end_stream=end_stream)
        except _SEND_ERRORS:
            self._drop(sid)  # the client reset the stream meanwhile
            return
        if end_stream:
            self._local_end(sid, st)

    def send_continue(self, sid: int) -> None:
        if sid in self._streams:
            try:
                self._conn.send_headers(sid, [(b":status", b"100")])
            except _SEND_ERRORS:
                self._drop(sid)

    def drain(self) -> None:
        """GOAWAY(NO_ERROR) naming the last stream taken; open streams finish."""
        self.goaway(0)

    @property
    def reusable(self) -> bool:
        return not self.closed

    def _sink_data(self, sid: int, data: bytes) -> None:
        self.sink.on_request_data(sid, data)

    def _sink_end(self, sid: int) -> None:
        self.sink.on_request_end(sid)

    def _sink_trailers(self, sid: int, trailers: HeaderList) -> None:
        self.sink.on_request_trailers(sid, trailers)


# ---------------------------------------------------------------------------------- client


class Http2ClientCodec(_H2Codec):
    """Upstream side: requests out, responses in, many streams on one connection."""

    sink: ClientSink

    def __init__(
        self,
        sink: ClientSink,
        options: Http2Options = DEFAULT_OPTIONS,
        stats: Http2Stats | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(True, options, stats, clock)
        self.sink = sink

    _stream_cap = _BIG
    _no_new_streams = False

    @property
    def max_concurrent_streams(self) -> int:
        """The peer's SETTINGS_MAX_CONCURRENT_STREAMS (capped by an assignment)."""
        return min(int(self._conn.remote_settings.max_concurrent_streams), self._stream_cap)

    @max_concurrent_streams.setter
    def max_concurrent_streams(self, value: int) -> None:
        self._stream_cap = value

    @property
    def keep_alive(self) -> bool:
        """False after a GOAWAY (either way), a connection error or ``keep_alive = False``."""
        return not (self.closed or self._no_new_streams)

    @keep_alive.setter
    def keep_alive(self, value: bool) -> None:
        self._no_new_streams = not value

    def new_stream(self) -> int:
        sid = int(self._conn.get_next_available_stream_id())
        return sid

    def send_headers(self, sid: int, head: RequestHead, end_stream: bool = False) -> None:
        if self.closed:
            raise CodecError(503, "HTTP/2 upstream connection is closing (GOAWAY)")
        pairs = request_header_list(head)
        st = _Stream(self._clock())
        self._streams[sid] = st
        self._streams_opened += 1
        self._conn.send_headers(sid, pairs, end_stream=end_stream)
        if end_stream:
            self._local_end(sid, st)

    def _other_event(self, ev: Any) -> None:
        if type(ev) is h2.events.ResponseReceived:
            sid = ev.stream_id
            if sid not in self._streams:
                return
            status = 0
            pairs: HeaderList = []
            has_cl = False
            for n, v in ev.headers:
                if n[:1] == b":":
                    if n == b":status":
                        status = int(v)
                    continue
                if n == b"content-length":
                    has_cl = True
                pairs.append((n, v))
            self.sink.on_response_headers(sid, ResponseHead(status, pairs, None, has_cl))

    def _sink_data(self, sid: int, data: bytes) -> None:
        self.sink.on_response_data(sid, data)

    def _sink_end(self, sid: int) -> None:
        self.sink.on_response_end(sid)

    def _sink_trailers(self, sid: int, trailers: HeaderList) -> None:
        self.sink.on_response_trailers(sid, trailers)

    def _premature_reset(self, st: _Stream) -> None:
        # upstream resets are the upstream's business; rapid reset guards downstream peers
        return


if TYPE_CHECKING:  # mypy checks that both classes implement core's codec interfaces

    def _server(s: ServerSink) -> ServerCodec:
        return Http2ServerCodec(s)

    def _client(c: ClientSink) -> ClientCodec:
        return Http2ClientCodec(c)
