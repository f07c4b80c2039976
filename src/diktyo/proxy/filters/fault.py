"""Fault injection decision (Istio HTTPFaultInjection, Envoy's fault filter), sans-I/O.

``decide_fault(fault, rng)`` draws whether this request is delayed and/or aborted. As in
Envoy, delay and abort are decided independently (a request can be both delayed and then
aborted) and each percentage is a float in [0, 100]: ``rng.random() * 100 < percentage``.
One draw is always made for each configured fault, delay first, so a fixed seed gives a fixed
sequence. The proxy applies the delay first, then the abort (response flags ``DI`` / ``FI``):
``FaultFilter`` is that step in the filter chain.
"""

from __future__ import annotations

import asyncio
import random

from diktyo.proxy.codec.events import RequestHead
from diktyo.proxy.filters.contract import (
    CONTINUE,
    STOP,
    FilterCallbacks,
    FilterStatus,
    HttpFilter,
)
from diktyo.snapshot.model import Fault

STATS = ("delays_injected", "aborts_injected")  # Envoy's fault filter counter names


def decide_fault(fault: Fault | None, rng: random.Random) -> tuple[float | None, int | None]:
    """(delay seconds or None, abort HTTP status or None) for one request."""
    if fault is None:
        return None, None
    delay: float | None = None
    abort: int | None = None
    d = fault.delay
    if d is not None and rng.random() * 100.0 < d.percentage and d.fixed_delay > 0:
        delay = d.fixed_delay
    a = fault.abort
    if a is not None and rng.random() * 100.0 < a.percentage:
        abort = a.http_status
    return delay, abort


MSG_FAULT_ABORT = b"fault filter abort"


class FaultFilter(HttpFilter):
    """Envoy's fault filter on the route's ``fault``: delay (flag ``DI``), then abort (``FI``).

    A delay stops the decoder chain and resumes it from a timer; a stream that ended meanwhile
    (client gone, timeout) is left alone."""

    __slots__ = ("loop", "rng")

    def __init__(self, loop: asyncio.AbstractEventLoop, rng: random.Random) -> None:
        self.loop = loop
        self.rng = rng

    def decode_headers(self, cb: FilterCallbacks, head: RequestHead) -> FilterStatus:
        cr = cb.route_entry()
        if cr is None or cr.route.fault is None:
            return CONTINUE
        delay, abort = decide_fault(cr.route.fault, self.rng)
        if delay is not None and delay > 0:
            cb.add_flag("DI")
            self.loop.call_later(delay, self._after_delay, cb, abort)
            return STOP
        if abort is not None:
            self._abort(cb, abort)
            return STOP
        return CONTINUE

    def _after_delay(self, cb: FilterCallbacks, abort: int | None) -> None:
        if not cb.active():
            return
        if abort is not None:
            self._abort(cb, abort)
            return
        cb.continue_decoding()

    def _abort(self, cb: FilterCallbacks, status: int) -> None:
        # telemetry names the route's destination service, as Envoy knows the route's cluster
        # before its fault filter runs (no upstream request is started)
        cr = cb.route_entry()
        if cr is not None and cr.route.clusters:
            cb.set_upstream_cluster(cr.route.clusters[0].cluster)
        abort = cr.route.fault.abort if cr is not None and cr.route.fault is not None else None
        if abort is not None and abort.grpc_status is not None:
            cb.set_state("grpc_status", abort.grpc_status)  # a gRPC client gets this status
        cb.send_local_reply(status, MSG_FAULT_ABORT, "FI")
