"""What both HTTP/2 codecs share (`h2`-based ``http2.py`` and libnghttp2-based
``http2_nghttp2.py``): Envoy's limits, the ``http2.*`` counters, the preface and the
connection-specific header names. Imports nothing heavy, so choosing a codec costs nothing."""

from __future__ import annotations

from dataclasses import dataclass

# the header lists and blocks diktyo sends: compiled with the hot path (http2_fields.py)
from diktyo.proxy.codec.http2_fields import lower_pairs as lower_pairs
from diktyo.proxy.codec.http2_fields import request_header_block as request_header_block
from diktyo.proxy.codec.http2_fields import request_header_list as request_header_list
from diktyo.proxy.codec.http2_fields import response_header_block as response_header_block

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"  # what an h2c (prior knowledge) client sends first


@dataclass(frozen=True, slots=True)
class Http2Options:
    """Limits, named and defaulted as Envoy's ``http2_protocol_options`` (and its overload
    runtime keys). Window sizes and the stream limit follow Envoy's edge best practice (64 KiB,
    1 MiB, 100 streams) instead of its 256 MiB / 2^31-1 defaults: a sidecar in Python must not
    let one peer make it buffer 256 MiB."""

    max_concurrent_streams: int = 100
    initial_stream_window_size: int = 65_536
    initial_connection_window_size: int = 1_048_576
    max_header_list_bytes: int = 60 * 1024  # max_request_headers_kb: 60
    max_headers_count: int = 100
    max_outbound_control_frames: int = 1000
    max_consecutive_inbound_frames_with_empty_payload: int = 1
    max_inbound_priority_frames_per_stream: int = 100
    max_inbound_window_update_frames_per_data_frame_sent: int = 10
    premature_reset_total_stream_count: int = 500
    premature_reset_min_stream_lifetime: float = 1.0


DEFAULT_OPTIONS = Http2Options()


@dataclass(slots=True)
class Http2Stats:
    """Envoy's ``http2.*`` codec counters (one object may be shared by every connection)."""

    rx_reset: int = 0
    tx_reset: int = 0
    goaway_sent: int = 0
    header_overflow: int = 0
    rx_messaging_error: int = 0
    streams_refused: int = 0  # beyond max_concurrent_streams
    outbound_control_flood: int = 0
    inbound_empty_frames_flood: int = 0
    inbound_priority_frames_flood: int = 0
    inbound_window_update_frames_flood: int = 0
    premature_resets: int = 0
    rapid_reset_goaway: int = 0
    continuation_flood: int = 0
    trailers: int = 0

    def as_dict(self) -> dict[str, int]:
        return {f"http2.{k}": getattr(self, k) for k in self.__dataclass_fields__}


class NghttpUnavailable(RuntimeError):
    """libnghttp2 (Debian ``libnghttp2-14``) or cffi is missing or too old (raised by
    ``http2_nghttp2.py``; defined here because mypyc compiles that module and cannot compile
    a ``RuntimeError`` subclass)."""


_lower = lower_pairs
