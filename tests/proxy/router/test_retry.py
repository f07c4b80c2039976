"""Retry decisions: Envoy's retryOn conditions, Istio's default, attempts, back-off, budget."""

from __future__ import annotations

import gc
import random

import pytest

from diktyo.proxy.router.retry import (
    GATEWAY_ERRORS,
    ISTIO_DEFAULT_RETRY_POLICY,
    RetryBudget,
    RetryState,
    compile_policy,
)
from diktyo.snapshot.model import RetryPolicy


def rs(retry_on: str, attempts: int = 5, codes: tuple[int, ...] = (), **kw: object) -> RetryState:
    policy = RetryPolicy(
        attempts=attempts, retry_on=tuple(retry_on.split(",")), retriable_status_codes=codes, **kw
    )  # type: ignore[arg-type]
    return RetryState(policy, random.Random(1))


RESETS = ["connect-failure", "reset", "refused-stream", "timeout"]

# retryOn -> (statuses retried, statuses not retried, resets retried)
CASES = {
    "5xx": ([500, 501, 502, 503, 504, 599], [200, 404, 409, 429], RESETS),
    "gateway-error": ([502, 503, 504], [500, 501, 409, 200], RESETS),
    "reset": ([], [500, 502, 503, 504], RESETS),
    "connect-failure": ([], [500, 503], ["connect-failure"]),
    "refused-stream": ([], [500, 503], ["refused-stream"]),
    "retriable-4xx": ([409], [400, 404, 429, 500, 503], []),
    "retriable-status-codes": ([], [503, 500], []),  # no codes listed: nothing
    "503": ([503], [500, 502, 504], []),  # Istio: bare codes are retriable status codes
    "unavailable": ([], [503, 500], []),  # gRPC: never matches a plain HTTP response
    "cancelled": ([], [499, 503], []),
}


@pytest.mark.parametrize("retry_on", sorted(CASES))
def test_retry_on_values(retry_on: str) -> None:
    yes, no, resets = CASES[retry_on]
    for status in yes:
        assert rs(retry_on).should_retry_status(status), (retry_on, status)
    for status in no:
        assert not rs(retry_on).should_retry_status(status), (retry_on, status)
    for kind in RESETS:
        assert rs(retry_on).should_retry_reset(kind) is (kind in resets), (retry_on, kind)


def test_retriable_status_codes_with_codes() -> None:
    assert rs("retriable-status-codes", codes=(429, 503)).should_retry_status(429)
    assert not rs("retriable-status-codes", codes=(429,)).should_retry_status(503)
    # codes without the retriable-status-codes condition do not apply (Envoy)
    assert not rs("connect-failure", codes=(503,)).should_retry_status(503)


def test_combined_and_whitespace() -> None:
    r = rs("connect-failure, 503 ,retriable-4xx")
    assert r.should_retry_status(503)
    assert r.should_retry_status(409)
    assert r.should_retry_reset("connect-failure")
    assert not r.should_retry_status(500)


def test_grpc_conditions_match_grpc_status_header() -> None:
    assert rs("unavailable").should_retry_status(200, {"grpc-status": "14"})
    assert rs("cancelled").should_retry_status(200, {"grpc-status": "1"})
    assert rs("deadline-exceeded").should_retry_status(200, {"grpc-status": "4"})
    assert rs("resource-exhausted").should_retry_status(200, {"grpc-status": "8"})
    assert rs("internal").should_retry_status(200, {"grpc-status": "13"})
    assert not rs("unavailable").should_retry_status(200, {"grpc-status": "0"})
    assert not rs("unavailable").should_retry_status(503, {})


def test_overloaded_response_never_retried() -> None:
    assert not rs("5xx").should_retry_status(503, {"x-envoy-overloaded": "true"})
    assert rs("5xx").should_retry_status(503, {"server": "x"})


def test_envoy_ratelimited() -> None:
    assert rs("envoy-ratelimited").should_retry_status(429, {"x-envoy-ratelimited": "true"})
    assert not rs("envoy-ratelimited").should_retry_status(429, {})


def test_overflow_reset_never_retried() -> None:
    assert not rs("5xx,reset,gateway-error").should_retry_reset("overflow")


def test_gateway_errors_constant() -> None:
    assert GATEWAY_ERRORS == {502, 503, 504}


def test_attempts_limit() -> None:
    r = rs("5xx", attempts=2)
    assert r.attempts_done == 1 and r.max_attempts == 3
    assert r.should_retry_status(503) and r.attempts_done == 2
    assert r.should_retry_reset("reset") and r.attempts_done == 3
    assert not r.should_retry_status(503)
    assert r.refused == "limit" and r.attempts_done == 3


def test_attempts_zero_never_retries() -> None:
    r = rs("5xx,connect-failure", attempts=0)
    assert not r.should_retry_status(503)
    assert not r.should_retry_reset("connect-failure")


def test_istio_default_policy() -> None:
    for policy in (None, RetryPolicy()):  # no retries in the VirtualService
        r = RetryState(policy, random.Random(1))
        assert r.max_attempts == 3 and r.per_try_timeout is None
        assert r.should_retry_status(503)  # retriable-status-codes: 503
        assert r.should_retry_reset("connect-failure")
        assert not r.should_retry_status(503)  # 2 retries used
    for status in (500, 502, 504):
        assert not RetryState(None, random.Random(1)).should_retry_status(status)
    assert RetryState(None, random.Random(1)).should_retry_reset("refused-stream")
    assert not RetryState(None, random.Random(1)).should_retry_reset("reset")
    assert not RetryState(None, random.Random(1)).should_retry_reset("timeout")
    assert ISTIO_DEFAULT_RETRY_POLICY.retriable_status_codes == (503,)
    # attempts given, retryOn left to the default: still Istio's default conditions
    assert RetryState(RetryPolicy(attempts=5), random.Random(1)).should_retry_status(503)


def test_per_try_timeout_and_unknown_values() -> None:
    r = rs("5xx,bogus", per_try_timeout=0.5)
    assert r.per_try_timeout == 0.5
    assert compile_policy(r.policy).unknown == ("bogus",)


def test_backoff_bounds_seeded() -> None:
    caps = [0.025, 0.05, 0.1, 0.2, 0.25, 0.25, 0.25]
    maxima = [0.0] * len(caps)
    for seed in range(300):
        r = RetryState(RetryPolicy(attempts=10, retry_on=("5xx",)), random.Random(seed))
        for i, cap in enumerate(caps):
            b = r.next_backoff()
            assert 0.0 <= b < cap
            maxima[i] = max(maxima[i], b)
    for m, cap in zip(maxima, caps, strict=False):
        assert m > cap * 0.9  # fully jittered: the whole range is used
    a = RetryState(None, random.Random(5))
    b = RetryState(None, random.Random(5))
    assert [a.next_backoff() for _ in range(4)] == [b.next_backoff() for _ in range(4)]


def test_budget_limits() -> None:
    b = RetryBudget(20.0, 3)
    assert b.limit(0) == 3 and b.limit(10) == 3 and b.limit(100) == 20
    for _ in range(3):
        assert b.try_acquire(10)
    assert not b.try_acquire(10)
    assert b.counters["upstream_rq_retry_overflow"] == 1
    assert b.try_acquire(100)
    b.release()
    assert b.in_flight == 3 and b.active == 3


def test_budget_refuses_a_retry_storm() -> None:
    budget = RetryBudget(20.0, 3)
    budget.active_requests = 10  # kept by ClusterState in the proxy
    states = [
        RetryState(RetryPolicy(attempts=3, retry_on=("5xx",)), random.Random(i), budget)
        for i in range(10)
    ]
    granted = [s.should_retry_status(503) for s in states]
    assert granted.count(True) == 3  # max(3, 20 % of 10)
    assert [s.refused for s in states if not s.should_retry_status(503)]
    assert budget.in_flight == 3
    # retries finish: slots come back
    for s in states:
        s.finish()
    assert budget.in_flight == 0
    budget.active_requests = 100
    assert (
        sum(
            s2.should_retry_status(503)
            for s2 in [
                RetryState(RetryPolicy(attempts=3, retry_on=("5xx",)), random.Random(0), budget)
                for _ in range(40)
            ]
        )
        == 20
    )


def test_budget_slot_moves_with_the_next_decision_and_gc() -> None:
    budget = RetryBudget(20.0, 3)
    r = RetryState(RetryPolicy(attempts=3, retry_on=("5xx",)), random.Random(0), budget)
    assert r.should_retry_status(503) and budget.in_flight == 1
    assert r.should_retry_status(503) and budget.in_flight == 1  # the previous retry is over
    assert not r.should_retry_status(200) and budget.in_flight == 0
    r2 = RetryState(RetryPolicy(attempts=3, retry_on=("5xx",)), random.Random(0), budget)
    assert r2.should_retry_reset("reset") and budget.in_flight == 1
    del r2
    gc.collect()
    assert budget.in_flight == 0
