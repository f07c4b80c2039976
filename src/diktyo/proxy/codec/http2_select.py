"""Which HTTP/2 codec a sidecar runs: libnghttp2's (``http2_nghttp2.py``) or `h2`'s
(``http2.py``), chosen once per process (``$DIKTYO_HTTP2_CODEC``). Both implement the same
``codec/events.py`` contract, limits and counters; only the chosen one is imported."""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger("diktyo.proxy")

# ------------------------------------------------------------------ which codec runs

CODEC_ENV = "DIKTYO_HTTP2_CODEC"  # "auto" (default), "nghttp2" or "h2"
_selected: tuple[Any, Any, str] | None = None


def select_codec(choice: str | None = None) -> tuple[Any, Any, str]:
    """``(server codec class, client codec class, description)`` of the HTTP/2 codec to run,
    chosen once per process: ``$DIKTYO_HTTP2_CODEC`` = ``auto`` (libnghttp2 when it loads,
    else `h2`), ``nghttp2`` (fails if libnghttp2 cannot load) or ``h2``."""
    global _selected
    if choice is None and _selected is not None:
        return _selected
    want = (choice or os.environ.get(CODEC_ENV, "") or "auto").strip().lower()
    if want not in ("auto", "nghttp2", "h2"):
        raise ValueError(f"{CODEC_ENV}={want!r}: use auto, nghttp2 or h2")
    picked: tuple[Any, Any, str] | None = None
    if want in ("auto", "nghttp2"):
        from diktyo.proxy.codec import http2_nghttp2 as ng

        try:
            v = ng.version()
            desc = f"nghttp2 {v} ({ng.mode()})"
            picked = (ng.NgHttp2ServerCodec, ng.NgHttp2ClientCodec, desc)
            if ng.mode_note():
                log.info("HTTP/2: libnghttp2 through cffi's ABI mode: %s", ng.mode_note())
        except ng.NghttpUnavailable as e:
            if want == "nghttp2":
                raise
            log.warning("HTTP/2: libnghttp2 unavailable, using the h2 library: %s", e)
    if picked is None:
        import h2

        from diktyo.proxy.codec import http2 as h2codec

        picked = (h2codec.Http2ServerCodec, h2codec.Http2ClientCodec, f"h2 {h2.__version__}")
    if choice is None:
        _selected = picked
        log.info("HTTP/2 codec: %s (%s=%s)", picked[2], CODEC_ENV, want)
    return picked


def codec_description() -> str:
    """What ``proxy-config`` / the admin page show: which HTTP/2 codec this process runs."""
    return str(select_codec()[2])
