"""Trace context propagation (W3C traceparent/tracestate, B3 multi and single header) and spans.

Theory of operation
-------------------
The sidecar calls :func:`extract` on the incoming request headers (lower-case names), then
:func:`start_span` with the parent context (or ``None``), a :class:`Sampler`, a random source
and a clock. A sampling decision already carried by the request (``x-b3-sampled``, ``b3``,
``traceparent`` flags, ``x-b3-flags: 1``) is honoured; otherwise the sampler decides with its
percentage (Istio's default 1 %). :func:`inject` gives the headers to set on the upstream
request, in both W3C and B3 forms as Envoy does with B3 propagation, plus ``x-request-id``.
:meth:`Span.finish` stamps the end time and the HTTP status; sampled spans go to an exporter.

Pure code: the clock and the random source are parameters.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from random import Random
from typing import Literal

from diktyo.core.clock import Clock

SpanKind = Literal["server", "client", "internal"]
StatusCode = Literal["unset", "ok", "error"]

_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_HEX16 = re.compile(r"^[0-9a-f]{16}$")
_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")
_SAFE = re.compile(r"^[\x20-\x7e]*$")  # printable ASCII: never forward CR/LF or controls
_ZERO32 = "0" * 32
_ZERO16 = "0" * 16
MAX_TRACESTATE = 512

# Headers this module reads and writes (lower-case).
PROPAGATION_HEADERS = (
    "traceparent",
    "tracestate",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
    "x-request-id",
)


@dataclass(frozen=True, slots=True)
class SpanContext:
    """What a request carries about its trace. Ids are lower-case hex (32 / 16 digits)."""

    trace_id: str
    span_id: str
    sampled: bool | None = None  # None: no decision carried, the local sampler decides
    parent_span_id: str | None = None  # B3's x-b3-parentspanid, informational
    tracestate: str = ""
    request_id: str = ""


@dataclass(slots=True)
class Span:
    """One unit of work in a trace (a request as seen by one sidecar, server or client side)."""

    trace_id: str
    span_id: str
    parent_id: str | None
    name: str
    kind: SpanKind
    start_ns: int
    sampled: bool
    end_ns: int = 0
    attributes: dict[str, str | int | float | bool] = field(default_factory=dict)
    status: StatusCode = "unset"
    status_message: str = ""
    tracestate: str = ""
    request_id: str = ""

    @property
    def context(self) -> SpanContext:
        return SpanContext(
            self.trace_id, self.span_id, self.sampled, self.parent_id, self.tracestate,
            self.request_id,
        )  # fmt: skip

    @property
    def duration_ms(self) -> float:
        return max(0, self.end_ns - self.start_ns) / 1e6

    def finish(
        self, clock: Clock, status_code: int | None = None, response_flags: str = "-"
    ) -> None:
        """End the span; HTTP 5xx, 0 (no response) or a response flag other than "-" is an error."""
        # an end stamped when the response was written (Tracer.responded) is kept
        self.end_ns = max(self.start_ns, self.end_ns or int(clock.time() * 1e9))
        if status_code is not None:
            self.attributes["http.status_code"] = status_code
            self.attributes["response_flags"] = response_flags
            if status_code >= 500 or status_code == 0:
                self.status = "error"
                self.status_message = f"HTTP {status_code}" + (
                    f" ({response_flags})" if response_flags != "-" else ""
                )
            elif self.status == "unset":
                self.status = "ok" if response_flags == "-" else "unset"


class Sampler:
    """Percentage sampler (Istio's ``meshConfig.defaultConfig.tracing.sampling``, default 1 %)."""

    __slots__ = ("percent",)

    def __init__(self, percent: float = 1.0) -> None:
        if not 0.0 <= percent <= 100.0:
            raise ValueError(f"sampling percent must be within 0..100, got {percent}")
        self.percent = percent

    def should_sample(self, parent: SpanContext | None, rng: Random) -> bool:
        if parent is not None and parent.sampled is not None:
            return parent.sampled
        if self.percent >= 100.0:
            return True
        if self.percent <= 0.0:
            return False
        return rng.random() * 100.0 < self.percent


# --------------------------------------------------------------------------- extract


def _b3_sampled(value: str | None) -> bool | None:
    if value is None:
        return None
    v = value.strip().lower()
    if v in ("1", "true", "d"):
        return True
    if v in ("0", "false"):
        return False
    return None


def _norm_trace_id(tid: str) -> str | None:
    tid = tid.strip().lower()
    if len(tid) == 16 and _HEX16.match(tid):
        tid = "0" * 16 + tid
    if not _HEX32.match(tid) or tid == _ZERO32:
        return None
    return tid


def _norm_span_id(sid: str) -> str | None:
    sid = sid.strip().lower()
    if not _HEX16.match(sid) or sid == _ZERO16:
        return None
    return sid


def _from_traceparent(value: str, tracestate: str, request_id: str) -> SpanContext | None:
    m = _TRACEPARENT.match(value.strip().lower())
    if m is None:
        return None
    version, tid, sid, flags, rest = m.groups()
    if version == "ff" or (version == "00" and rest):
        return None
    if tid == _ZERO32 or sid == _ZERO16:
        return None
    state = tracestate.strip()
    if len(state) > MAX_TRACESTATE or not _SAFE.match(state):
        state = ""
    return SpanContext(tid, sid, bool(int(flags, 16) & 1), None, state, request_id)


def _from_b3_single(value: str, request_id: str) -> SpanContext | None:
    parts = value.strip().split("-")
    if len(parts) == 1:  # only a sampling decision: no context to continue
        return None
    if len(parts) < 2 or len(parts) > 4:
        return None
    tid, sid = _norm_trace_id(parts[0]), _norm_span_id(parts[1])
    if tid is None or sid is None:
        return None
    sampled = _b3_sampled(parts[2]) if len(parts) > 2 else None
    parent = _norm_span_id(parts[3]) if len(parts) > 3 else None
    return SpanContext(tid, sid, sampled, parent, "", request_id)


def request_id_of(headers: Mapping[str, str]) -> str:
    """The request's ``x-request-id`` if it is safe to forward (printable, <= 128), else ""."""
    rid = headers.get("x-request-id", "").strip()
    if len(rid) > 128 or not _SAFE.match(rid):
        return ""
    return rid


def extract(headers: Mapping[str, str]) -> SpanContext | None:
    """The trace context of an incoming request, or ``None`` if it carries none (or only bad ones).

    ``headers`` keys must be lower-case. W3C ``traceparent`` wins over B3; single ``b3`` over
    multi-header B3. Malformed values are ignored (a new trace is started), never raised.
    """
    request_id = request_id_of(headers)
    tp = headers.get("traceparent")
    if tp:
        ctx = _from_traceparent(tp, headers.get("tracestate", ""), request_id)
        if ctx is not None:
            return ctx
    single = headers.get("b3")
    if single:
        ctx = _from_b3_single(single, request_id)
        if ctx is not None:
            return ctx
    tid_raw, sid_raw = headers.get("x-b3-traceid"), headers.get("x-b3-spanid")
    if tid_raw and sid_raw:
        tid, sid = _norm_trace_id(tid_raw), _norm_span_id(sid_raw)
        if tid is not None and sid is not None:
            sampled = _b3_sampled(headers.get("x-b3-sampled"))
            if headers.get("x-b3-flags", "").strip() == "1":
                sampled = True  # debug
            praw = headers.get("x-b3-parentspanid")
            parent = _norm_span_id(praw) if praw else None
            return SpanContext(tid, sid, sampled, parent, "", request_id)
    return None


def sampling_only(headers: Mapping[str, str]) -> bool | None:
    """A bare sampling decision without ids (``b3: 0`` or ``x-b3-sampled: 0`` alone)."""
    single = headers.get("b3")
    if single and "-" not in single:
        return _b3_sampled(single)
    if "x-b3-traceid" not in headers:
        return _b3_sampled(headers.get("x-b3-sampled"))
    return None


# --------------------------------------------------------------------------- spans


def new_trace_id(rng: Random) -> str:
    while True:
        v = rng.getrandbits(128)
        if v:
            return f"{v:032x}"


def new_span_id(rng: Random) -> str:
    while True:
        v = rng.getrandbits(64)
        if v:
            return f"{v:016x}"


def new_request_id(rng: Random) -> str:
    """A UUID4 for ``x-request-id`` (Envoy generates one when the request has none)."""
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def start_span(
    parent: SpanContext | None,
    name: str,
    kind: SpanKind,
    sampler: Sampler,
    rng: Random,
    clock: Clock,
    attributes: Mapping[str, str | int | float | bool] | None = None,
    sampled: bool | None = None,
) -> Span:
    """Start a span as a child of ``parent`` (or a new trace). ``sampled`` overrides the sampler."""
    decision = sampled if sampled is not None else sampler.should_sample(parent, rng)
    if parent is None:
        trace_id, parent_id, state, rid = new_trace_id(rng), None, "", new_request_id(rng)
    else:
        trace_id, parent_id, state = parent.trace_id, parent.span_id, parent.tracestate
        rid = parent.request_id or new_request_id(rng)
    return Span(
        trace_id=trace_id,
        span_id=new_span_id(rng),
        parent_id=parent_id,
        name=name,
        kind=kind,
        start_ns=int(clock.time() * 1e9),
        sampled=decision,
        attributes=dict(attributes) if attributes else {},
        tracestate=state,
        request_id=rid,
    )


def inject(span: Span | SpanContext) -> list[tuple[str, str]]:
    """Headers for the upstream request: W3C and multi-header B3 for ``span``, and x-request-id.

    The receiver sees ``span`` as its parent. The caller removes any incoming propagation
    headers first (see :data:`PROPAGATION_HEADERS`) so values are not duplicated.
    """
    sampled: bool | None
    if isinstance(span, Span):
        tid, sid, sampled, parent = span.trace_id, span.span_id, span.sampled, span.parent_id
        state, rid = span.tracestate, span.request_id
    else:
        tid, sid, sampled, parent = span.trace_id, span.span_id, span.sampled, span.parent_span_id
        state, rid = span.tracestate, span.request_id
    flag = "1" if sampled else "0"
    out = [("traceparent", f"00-{tid}-{sid}-0{flag}")]
    if state:
        out.append(("tracestate", state))
    out.append(("x-b3-traceid", tid))
    out.append(("x-b3-spanid", sid))
    if parent:
        out.append(("x-b3-parentspanid", parent))
    out.append(("x-b3-sampled", flag))
    if rid:
        out.append(("x-request-id", rid))
    return out


def span_name(host: str, port: int | None = None) -> str:
    """Envoy/Istio's default operation name: ``reviews.default.svc.cluster.local:9080/*``."""
    return f"{host}:{port}/*" if port else f"{host}/*"
