"""OTLP/HTTP trace export: protobuf encoding of spans and a non-blocking batching exporter.

``encode_spans`` / ``decode_spans`` are pure (the ``opentelemetry-proto`` messages).
:class:`OtlpExporter` is the thin async shell: ``export(span)`` only appends to a bounded
queue (never blocks, never raises; drops and counts when full); one background task owned by
the exporter posts batches to ``POST <endpoint>`` (``/v1/traces``,
``Content-Type: application/x-protobuf``) and is cancelled by ``close()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Self
from urllib.parse import urlsplit

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from diktyo.telemetry.httpclient import request
from diktyo.telemetry.tracing import Span

log = logging.getLogger(__name__)

CONTENT_TYPE = "application/x-protobuf"
SCOPE_NAME = "diktyo"

_KIND_TO_PB = {
    "internal": trace_pb2.Span.SPAN_KIND_INTERNAL,
    "server": trace_pb2.Span.SPAN_KIND_SERVER,
    "client": trace_pb2.Span.SPAN_KIND_CLIENT,
}
_KIND_FROM_PB = {v: k for k, v in _KIND_TO_PB.items()}
_STATUS_TO_PB = {
    "unset": trace_pb2.Status.STATUS_CODE_UNSET,
    "ok": trace_pb2.Status.STATUS_CODE_OK,
    "error": trace_pb2.Status.STATUS_CODE_ERROR,
}
_STATUS_FROM_PB = {v: k for k, v in _STATUS_TO_PB.items()}

AttrValue = str | int | float | bool


def _any_value(v: AttrValue) -> common_pb2.AnyValue:
    if isinstance(v, bool):
        return common_pb2.AnyValue(bool_value=v)
    if isinstance(v, int):
        return common_pb2.AnyValue(int_value=v)
    if isinstance(v, float):
        return common_pb2.AnyValue(double_value=v)
    return common_pb2.AnyValue(string_value=str(v))


def _from_any(v: common_pb2.AnyValue) -> AttrValue:
    which = v.WhichOneof("value")
    if which == "bool_value":
        return v.bool_value
    if which == "int_value":
        return v.int_value
    if which == "double_value":
        return v.double_value
    if which == "string_value":
        return v.string_value
    return str(v).strip()


def _kvs(attrs: Mapping[str, AttrValue]) -> list[common_pb2.KeyValue]:
    return [common_pb2.KeyValue(key=k, value=_any_value(v)) for k, v in attrs.items()]


def encode_spans(
    spans: Iterable[Span],
    service_name: str,
    resource_attributes: Mapping[str, AttrValue] | None = None,
) -> bytes:
    """An ``ExportTraceServiceRequest`` with one resource (this sidecar) holding ``spans``."""
    res_attrs: dict[str, AttrValue] = {"service.name": service_name}
    if resource_attributes:
        res_attrs.update(resource_attributes)
    pb_spans = []
    for s in spans:
        pb_spans.append(
            trace_pb2.Span(
                trace_id=bytes.fromhex(s.trace_id),
                span_id=bytes.fromhex(s.span_id),
                parent_span_id=bytes.fromhex(s.parent_id) if s.parent_id else b"",
                trace_state=s.tracestate,
                name=s.name,
                kind=_KIND_TO_PB.get(s.kind, trace_pb2.Span.SPAN_KIND_UNSPECIFIED),
                start_time_unix_nano=s.start_ns,
                end_time_unix_nano=s.end_ns or s.start_ns,
                attributes=_kvs(s.attributes),
                status=trace_pb2.Status(code=_STATUS_TO_PB[s.status], message=s.status_message),
            )
        )
    req = trace_service_pb2.ExportTraceServiceRequest(
        resource_spans=[
            trace_pb2.ResourceSpans(
                resource=resource_pb2.Resource(attributes=_kvs(res_attrs)),
                scope_spans=[
                    trace_pb2.ScopeSpans(
                        scope=common_pb2.InstrumentationScope(name=SCOPE_NAME), spans=pb_spans
                    )
                ],
            )
        ]
    )
    return bytes(req.SerializeToString())


@dataclass(slots=True)
class DecodedSpan:
    """A span as received over OTLP, flattened with its resource's service name."""

    trace_id: str
    span_id: str
    parent_id: str | None
    name: str
    kind: str
    start_ns: int
    end_ns: int
    service: str
    status: str = "unset"
    status_message: str = ""
    attributes: dict[str, AttrValue] = field(default_factory=dict)
    resource: dict[str, AttrValue] = field(default_factory=dict)

    @property
    def duration_ms(self) -> float:
        return max(0, self.end_ns - self.start_ns) / 1e6

    def to_json(self) -> dict[str, Any]:
        return {
            "traceId": self.trace_id,
            "spanId": self.span_id,
            "parentId": self.parent_id,
            "name": self.name,
            "kind": self.kind,
            "startNs": self.start_ns,
            "endNs": self.end_ns,
            "durationMs": self.duration_ms,
            "service": self.service,
            "status": self.status,
            "statusMessage": self.status_message,
            "attributes": self.attributes,
        }


class OtlpDecodeError(ValueError):
    """The body is not a valid OTLP ExportTraceServiceRequest."""


def decode_spans(body: bytes) -> list[DecodedSpan]:
    """Parse an ``ExportTraceServiceRequest`` (untrusted input: raises OtlpDecodeError only)."""
    req = trace_service_pb2.ExportTraceServiceRequest()
    try:
        req.ParseFromString(body)
    except Exception as e:  # protobuf raises DecodeError / RuntimeWarning-ish errors
        raise OtlpDecodeError(f"not an OTLP ExportTraceServiceRequest: {e}") from e
    out: list[DecodedSpan] = []
    for rs in req.resource_spans:
        res = {kv.key: _from_any(kv.value) for kv in rs.resource.attributes}
        service = str(res.get("service.name", "unknown"))
        for ss in rs.scope_spans:
            for s in ss.spans:
                if len(s.trace_id) != 16 or len(s.span_id) != 8:
                    raise OtlpDecodeError(
                        "span with a trace id not 16 bytes or span id not 8 bytes"
                    )
                out.append(
                    DecodedSpan(
                        trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(),
                        parent_id=s.parent_span_id.hex() if s.parent_span_id else None,
                        name=s.name,
                        kind=_KIND_FROM_PB.get(s.kind, "internal"),
                        start_ns=s.start_time_unix_nano,
                        end_ns=s.end_time_unix_nano,
                        service=service,
                        status=_STATUS_FROM_PB.get(s.status.code, "unset"),
                        status_message=s.status.message,
                        attributes={kv.key: _from_any(kv.value) for kv in s.attributes},
                        resource=res,
                    )
                )
    return out


# --------------------------------------------------------------------------- async shell


async def post(
    url: str, body: bytes, content_type: str = CONTENT_TYPE, timeout: float = 5.0
) -> int:
    """POST ``body``; returns the HTTP status. Raises OSError / TimeoutError on failure."""
    status, _ = await request("POST", url, body, content_type, timeout, max_body=1 << 20)
    return status


class OtlpExporter:
    """Batches finished spans to an OTLP/HTTP collector (Jaeger, Tempo, the control plane).

    ``export()`` is safe on the hot path. Call ``start()`` inside the running loop (or use
    ``async with``); ``close()`` flushes what is queued (bounded by ``close_timeout``) and
    cancels the background task.
    """

    def __init__(
        self,
        endpoint: str,
        max_queue: int = 2048,
        batch_size: int = 256,
        flush_interval: float = 1.0,
        service_name: str = "diktyo-proxy",
        resource_attributes: Mapping[str, AttrValue] | None = None,
        timeout: float = 5.0,
    ) -> None:
        u = urlsplit(endpoint)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(
                f"OTLP endpoint {endpoint!r} must look like http://host:4318/v1/traces"
            )
        self.endpoint = endpoint
        self.max_queue = max_queue
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.service_name = service_name
        self.resource_attributes = dict(resource_attributes or {})
        self.timeout = timeout
        self._queue: deque[Span] = deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        # counters (read by the sidecar's stats)
        self.exported = 0
        self.dropped = 0  # queue full
        self.failed = 0  # spans in batches the collector did not accept

    @property
    def queued(self) -> int:
        return len(self._queue)

    def export(self, span: Span) -> None:
        """Queue a finished span; drops (and counts) when the queue is full or closed."""
        if self._closing or len(self._queue) >= self.max_queue:
            self.dropped += 1
            return
        self._queue.append(span)
        if len(self._queue) >= self.batch_size and self._wake is not None:
            self._wake.set()

    def start(self) -> None:
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"otlp-exporter {self.endpoint}"
            )

    async def __aenter__(self) -> Self:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _run(self) -> None:
        assert self._wake is not None
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.flush_interval)
            self._wake.clear()
            while self._queue and not self._closing:
                await self._send_batch()
                if len(self._queue) < self.batch_size:
                    break
        await self.flush()  # closing: drain what is left

    async def _send_batch(self) -> None:
        n = min(self.batch_size, len(self._queue))
        batch = [self._queue.popleft() for _ in range(n)]
        try:
            body = encode_spans(batch, self.service_name, self.resource_attributes)
            status = await post(self.endpoint, body, CONTENT_TYPE, self.timeout)
        except asyncio.CancelledError:
            self.failed += n
            raise
        except Exception as e:  # noqa: BLE001 - exporting must never take the sidecar down
            self.failed += n
            log.warning("OTLP export of %d spans to %s failed: %s", n, self.endpoint, e)
            return
        if 200 <= status < 300:
            self.exported += n
        else:
            self.failed += n
            log.warning(
                "OTLP collector %s answered HTTP %d; %d spans lost", self.endpoint, status, n
            )

    async def flush(self) -> None:
        """Send everything queued now (used by close and tests)."""
        while self._queue:
            await self._send_batch()

    async def close(self, close_timeout: float = 2.0) -> None:
        """Stop accepting spans, send what is queued (at most ``close_timeout`` s), stop the task."""
        self._closing = True
        task, self._task = self._task, None
        if task is not None:
            assert self._wake is not None
            self._wake.set()
            try:
                await asyncio.wait_for(asyncio.shield(task), close_timeout)
            except TimeoutError:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.flush(), close_timeout)
        self.dropped += len(self._queue)
        self._queue.clear()
