"""Fault injection decision (Istio HTTPFaultInjection, Envoy's fault filter), sans-I/O.

``decide_fault(fault, rng)`` draws whether this request is delayed and/or aborted. As in
Envoy, delay and abort are decided independently (a request can be both delayed and then
aborted) and each percentage is a float in [0, 100]: ``rng.random() * 100 < percentage``.
One draw is always made for each configured fault, delay first, so a fixed seed gives a fixed
sequence. The proxy applies the delay first, then the abort (response flags ``DI`` / ``FI``).
"""

from __future__ import annotations

import random

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
