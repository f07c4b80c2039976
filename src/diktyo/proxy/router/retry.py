"""Retry state: whether and when to retry a request (Istio HTTPRetry, Envoy's retry policy).

Theory of operation
-------------------
One ``RetryState`` per request. After each failed try the proxy asks
``should_retry_status(status, headers)`` (a response arrived) or ``should_retry_reset(kind)``
(no response). ``True`` means *a retry is granted and already counted*: ``attempts_done`` was
incremented and, with a budget, a slot of the budget is held; the proxy waits
``next_backoff()`` seconds, picks a host (preferring untried ones) and tries again. ``False``
means answer with what we have. Call ``finish()`` when the request is over (any outcome) so a
held budget slot is given back; a slot is also given back by the next ``should_retry_*`` call
and when the state is garbage collected.

``retryOn`` conditions (Envoy's ``x-envoy-retry-on`` / ``x-envoy-retry-grpc-on``):

===========================  ==================================================================
5xx                          any 5xx response, and every kind of reset (connect failure,
                             refused stream, remote reset, per-try timeout)
gateway-error                502, 503, 504, and every kind of reset (as Envoy)
reset                        no response at all: every kind of reset, connect failure, timeout
connect-failure              connection to the upstream failed (incl. connect timeout)
refused-stream               HTTP/2 REFUSED_STREAM
retriable-4xx                409
retriable-status-codes       the codes in ``retriable_status_codes``
"503", "429", ...            Istio turns bare codes into retriable status codes
envoy-ratelimited            a response carrying ``x-envoy-ratelimited``
cancelled, deadline-exceeded, internal, resource-exhausted, unavailable
                             gRPC status 1, 4, 13, 8, 14 in the response headers
                             (never matches a plain HTTP/1 response)
===========================  ==================================================================

A response with ``x-envoy-overloaded`` (set on circuit-breaker overflow replies) is never
retried, as in Envoy.

Istio's default (no ``retries`` in the VirtualService): 2 retries on
``connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes`` with retriable
status code 503, back-off 25 ms base, host selection avoiding previously tried hosts.
A ``RetryPolicy`` whose ``retry_on`` is the snapshot model's default tuple and that lists no
status codes is taken to mean that default (so 503 is retried, as in Istio).

Back-off (Envoy's ``JitteredExponentialBackOffStrategy``): retry N waits a uniformly random
time in ``[0, min(25 ms * 2**(N-1), 250 ms))``.

Retry budget (Envoy's ``retry_budget``): retries in flight may not exceed
``max(min_retry_concurrency, budget_percent% of active requests)``; defaults 20 % and 3.
"""

from __future__ import annotations

import random
from typing import Any

from diktyo.snapshot.model import RetryPolicy

GATEWAY_ERRORS = frozenset({502, 503, 504})
BASE_BACKOFF = 0.025  # Envoy's default retry back-off base interval
MAX_BACKOFF = 0.25  # Envoy's default: 10 x base

# retryOn bits
R_5XX = 1 << 0
R_GATEWAY = 1 << 1
R_RESET = 1 << 2
R_CONNECT = 1 << 3
R_4XX = 1 << 4
R_REFUSED = 1 << 5
R_CODES = 1 << 6
R_RATELIMITED = 1 << 7
R_RESET_BEFORE_REQUEST = 1 << 8
R_GRPC_CANCELLED = 1 << 9
R_GRPC_DEADLINE = 1 << 10
R_GRPC_INTERNAL = 1 << 11
R_GRPC_RESOURCE = 1 << 12
R_GRPC_UNAVAILABLE = 1 << 13
R_GRPC = R_GRPC_CANCELLED | R_GRPC_DEADLINE | R_GRPC_INTERNAL | R_GRPC_RESOURCE | R_GRPC_UNAVAILABLE
R_ANY_RESET = R_5XX | R_GATEWAY | R_RESET

RETRY_ON_BITS: dict[str, int] = {
    "5xx": R_5XX,
    "gateway-error": R_GATEWAY,
    "reset": R_RESET,
    "connect-failure": R_CONNECT,
    "retriable-4xx": R_4XX,
    "refused-stream": R_REFUSED,
    "retriable-status-codes": R_CODES,
    "envoy-ratelimited": R_RATELIMITED,
    "reset-before-request": R_RESET_BEFORE_REQUEST,
    "cancelled": R_GRPC_CANCELLED,
    "deadline-exceeded": R_GRPC_DEADLINE,
    "internal": R_GRPC_INTERNAL,
    "resource-exhausted": R_GRPC_RESOURCE,
    "unavailable": R_GRPC_UNAVAILABLE,
}
# gRPC status code (grpc-status header) -> bit
_GRPC_STATUS_BITS = {
    "1": R_GRPC_CANCELLED,
    "4": R_GRPC_DEADLINE,
    "13": R_GRPC_INTERNAL,
    "8": R_GRPC_RESOURCE,
    "14": R_GRPC_UNAVAILABLE,
}

# what retry kinds each reset kind is retried under
_RESET_KIND_BITS = {
    "connect-failure": R_ANY_RESET | R_CONNECT,
    "refused-stream": R_ANY_RESET | R_REFUSED,
    "reset": R_ANY_RESET,
    "timeout": R_ANY_RESET,  # per-try timeout: Envoy treats it as a local reset
    "reset-before-request": R_ANY_RESET | R_RESET_BEFORE_REQUEST,
    "overflow": 0,  # local circuit-breaker overflow: never retried (Envoy)
}

_MODEL_DEFAULT_RETRY_ON = RetryPolicy().retry_on

ISTIO_DEFAULT_RETRY_POLICY = RetryPolicy(
    attempts=2,
    retry_on=(
        "connect-failure",
        "refused-stream",
        "unavailable",
        "cancelled",
        "retriable-status-codes",
    ),
    retriable_status_codes=(503,),
)


class CompiledRetryPolicy:
    """A ``RetryPolicy`` parsed once: bit mask, status codes, limits."""

    __slots__ = ("codes", "mask", "max_attempts", "per_try_timeout", "policy", "unknown")

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        mask = 0
        codes = set(policy.retriable_status_codes)
        unknown: list[str] = []
        retry_on = policy.retry_on
        if retry_on == _MODEL_DEFAULT_RETRY_ON and not codes:
            retry_on = ISTIO_DEFAULT_RETRY_POLICY.retry_on
            codes = set(ISTIO_DEFAULT_RETRY_POLICY.retriable_status_codes)
        for raw in retry_on:
            item = raw.strip().lower()
            if not item:
                continue
            if item.isdigit():
                codes.add(int(item))
                mask |= R_CODES
                continue
            bit = RETRY_ON_BITS.get(item)
            if bit is None:
                unknown.append(raw)
            else:
                mask |= bit
        self.mask = mask
        self.codes = frozenset(codes) if mask & R_CODES else frozenset()
        self.max_attempts = 1 + max(0, policy.attempts)
        self.per_try_timeout = policy.per_try_timeout if policy.per_try_timeout else None
        self.unknown = tuple(unknown)


_COMPILED: dict[int, CompiledRetryPolicy] = {}


def compile_policy(policy: RetryPolicy | None) -> CompiledRetryPolicy:
    """Parse a policy once (cached by object identity; snapshots are immutable)."""
    if policy is None:
        policy = ISTIO_DEFAULT_RETRY_POLICY
    c = _COMPILED.get(id(policy))
    if c is None or c.policy is not policy:
        if len(_COMPILED) > 4096:
            _COMPILED.clear()
        c = CompiledRetryPolicy(policy)
        _COMPILED[id(policy)] = c
    return c


class RetryBudget:
    """Retries in flight bounded by a percentage of active requests (Envoy's retry_budget).

    ``active_requests`` is kept by ``ClusterState`` (one budget per cluster); ``try_acquire``
    uses it unless given a count.
    """

    __slots__ = ("active_requests", "counters", "in_flight", "min_concurrency", "percent")

    def __init__(self, percent: float = 20.0, min_concurrency: int = 3) -> None:
        self.percent = percent
        self.min_concurrency = min_concurrency
        self.in_flight = 0
        self.active_requests: int = 0
        self.counters: dict[str, int] = {"upstream_rq_retry_overflow": 0, "retries_granted": 0}

    def update(self, percent: float, min_concurrency: int) -> None:
        self.percent = percent
        self.min_concurrency = min_concurrency

    @property
    def active(self) -> int:
        """Retries in flight (alias of ``in_flight``)."""
        return self.in_flight

    def limit(self, active_requests: int | None = None) -> int:
        active = self.active_requests if active_requests is None else active_requests
        return max(self.min_concurrency, int(self.percent / 100.0 * active))

    def try_acquire(self, active_requests: int | None = None) -> bool:
        if self.in_flight < self.limit(active_requests):
            self.in_flight += 1
            self.counters["retries_granted"] += 1
            return True
        self.counters["upstream_rq_retry_overflow"] += 1
        return False

    def release(self) -> None:
        if self.in_flight > 0:
            self.in_flight -= 1

    def describe(self) -> dict[str, Any]:
        return {
            "budget_percent": self.percent,
            "min_retry_concurrency": self.min_concurrency,
            "in_flight": self.in_flight,
            "limit": self.limit(),
            "counters": dict(self.counters),
        }


class RetryState:
    """Retry bookkeeping for one request."""

    __slots__ = (
        "_codes",
        "_holding",
        "_mask",
        "_next_interval",
        "attempts_done",
        "budget",
        "max_attempts",
        "per_try_timeout",
        "policy",
        "refused",
        "rng",
    )

    def __init__(
        self,
        policy: RetryPolicy | None,
        rng: random.Random,
        budget: RetryBudget | None = None,
    ) -> None:
        c = compile_policy(policy)
        self.policy = c.policy
        self.rng = rng
        self.budget = budget
        self.attempts_done = 1
        self.max_attempts = c.max_attempts
        self.per_try_timeout = c.per_try_timeout
        # why the last retry was refused: None, "limit" (attempts used up) or "overflow" (budget)
        self.refused: str | None = None
        self._mask = c.mask
        self._codes = c.codes
        self._next_interval = BASE_BACKOFF
        self._holding = False

    def __del__(self) -> None:
        if self._holding and self.budget is not None:
            self._holding = False
            self.budget.release()

    @property
    def retries_left(self) -> int:
        return self.max_attempts - self.attempts_done

    def _grant(self) -> bool:
        budget = self.budget
        if budget is not None and self._holding:
            self._holding = False
            budget.release()
        if self.attempts_done >= self.max_attempts:
            self.refused = "limit"
            return False
        if budget is not None:
            if not budget.try_acquire():
                self.refused = "overflow"
                return False
            self._holding = True
        self.attempts_done += 1
        self.refused = None
        return True

    def would_retry_status(self, status: int, headers: dict[str, str] | None = None) -> bool:
        """Does ``retryOn`` cover this response? (No attempt or budget accounting.)

        ``headers``: lower-case response header names; a response carrying
        ``x-envoy-overloaded`` (another proxy's circuit breaker) is never retried (Envoy).
        """
        if headers and "x-envoy-overloaded" in headers:
            return False
        mask = self._mask
        if mask & R_5XX and 500 <= status < 600:
            return True
        if mask & R_GATEWAY and (status == 502 or status == 503 or status == 504):
            return True
        if mask & R_4XX and status == 409:
            return True
        if mask & R_CODES and status in self._codes:
            return True
        if headers:
            if mask & R_RATELIMITED and "x-envoy-ratelimited" in headers:
                return True
            if mask & R_GRPC:
                g = headers.get("grpc-status")
                if g is not None and mask & _GRPC_STATUS_BITS.get(g.strip(), 0):
                    return True
        return False

    def would_retry_reset(self, kind: str) -> bool:
        return bool(self._mask & _RESET_KIND_BITS.get(kind, R_ANY_RESET))

    def should_retry_status(self, status: int, headers: dict[str, str] | None = None) -> bool:
        """A response arrived: retry it? True = granted and counted (``attempts_done`` += 1)."""
        if self.would_retry_status(status, headers):
            return self._grant()
        self.finish()
        return False

    def should_retry_reset(self, kind: str) -> bool:
        """No response: ``connect-failure``, ``reset``, ``refused-stream``, ``timeout``
        (per-try timeout), ``reset-before-request`` or ``overflow``. True = granted, counted."""
        if self.would_retry_reset(kind):
            return self._grant()
        self.finish()
        return False

    def next_backoff(self) -> float:
        """Seconds to wait before the retry just granted (fully jittered exponential)."""
        backoff = self._next_interval
        nxt = backoff * 2
        self._next_interval = min(MAX_BACKOFF, nxt)
        return self.rng.random() * backoff

    def finish(self) -> None:
        """The request is over: give back a held budget slot."""
        if self._holding:
            self._holding = False
            if self.budget is not None:
                self.budget.release()
