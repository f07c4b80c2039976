"""Circuit breaker: Envoy's limits and counters, messages naming the DestinationRule field."""

from __future__ import annotations

from diktyo.proxy.upstream.circuit_breaker import CircuitBreaker
from diktyo.snapshot.model import ConnectionPool


def test_defaults_are_effectively_unlimited() -> None:
    b = CircuitBreaker(ConnectionPool(), "")
    for _ in range(1000):
        assert b.can_open_connection()
        b.connection_opened()
        assert b.try_enter_pending()
        assert b.try_start_request()
        assert b.try_start_retry()
    assert b.counters == {
        "upstream_cx_overflow": 0,
        "upstream_rq_pending_overflow": 0,
        "upstream_rq_retry_overflow": 0,
    }


def test_max_connections() -> None:
    b = CircuitBreaker(ConnectionPool(max_connections=2), "DestinationRule httpbin")
    assert b.can_open_connection()
    b.connection_opened()
    b.connection_opened()
    assert not b.can_open_connection()
    assert b.counters["upstream_cx_overflow"] == 1
    assert not b.connection_capacity()  # polling does not count overflows
    assert b.counters["upstream_cx_overflow"] == 1
    assert b.is_open("connections")
    b.connection_closed()
    assert b.can_open_connection()
    assert not b.is_open("connections")


def test_pending_overflow() -> None:
    b = CircuitBreaker(ConnectionPool(max_connections=1, http1_max_pending_requests=1), "httpbin")
    b.connection_opened()
    assert not b.can_open_connection()  # the request must queue
    assert b.try_enter_pending()
    assert not b.try_enter_pending()  # queue full -> 503 UO
    assert b.counters["upstream_rq_pending_overflow"] == 1
    assert b.counters["upstream_cx_overflow"] == 1
    b.leave_pending()
    assert b.try_enter_pending()


def test_max_requests_counts_as_pending_overflow_like_envoy() -> None:
    b = CircuitBreaker(ConnectionPool(http2_max_requests=1), "httpbin")
    assert b.try_start_request()
    assert not b.try_start_request()
    assert b.counters["upstream_rq_pending_overflow"] == 1
    b.end_request()
    assert b.try_start_request()


def test_max_retries() -> None:
    b = CircuitBreaker(ConnectionPool(max_retries=1), "httpbin")
    assert b.try_start_retry()
    assert not b.try_start_retry()
    assert b.counters["upstream_rq_retry_overflow"] == 1
    b.end_retry()
    assert b.try_start_retry()


def test_releases_never_go_negative() -> None:
    b = CircuitBreaker(ConnectionPool(max_connections=1), "x")
    b.connection_closed()
    b.leave_pending()
    b.end_request()
    b.end_retry()
    assert (b.connections, b.pending, b.requests, b.retries) == (0, 0, 0, 0)


def test_messages_name_destination_rule_and_field() -> None:
    b = CircuitBreaker(
        ConnectionPool(
            max_connections=1, http1_max_pending_requests=1, http2_max_requests=3, max_retries=2
        ),
        "httpbin",
    )
    b.connection_opened()
    assert b.overflow_message("connections") == (
        "circuit breaker open: 1 of 1 connections in use "
        "(DestinationRule httpbin, connectionPool.tcp.maxConnections=1)"
    )
    b.try_enter_pending()
    m = b.overflow_message("pending")
    assert "1 of 1" in m and "DestinationRule httpbin" in m
    assert "connectionPool.http.http1MaxPendingRequests=1" in m
    assert "connectionPool.http.http2MaxRequests=3" in b.overflow_message("requests")
    assert "connectionPool.http.maxRetries=2" in b.overflow_message("retries")
    # Envoy counter names work too
    assert "maxConnections" in b.overflow_message("upstream_cx_overflow")


def test_message_keeps_a_full_source() -> None:
    b = CircuitBreaker(ConnectionPool(max_connections=1), "DestinationRule default/httpbin")
    assert "(DestinationRule default/httpbin, " in b.overflow_message("connections")
    anon = CircuitBreaker(ConnectionPool(max_connections=1), "")
    assert "no DestinationRule" in anon.overflow_message("connections")


def test_update_keeps_counts_and_applies_new_limits() -> None:
    b = CircuitBreaker(ConnectionPool(max_connections=1), "a")
    b.connection_opened()
    assert not b.can_open_connection()
    b.update(ConnectionPool(max_connections=5), "b")
    assert b.connections == 1 and b.can_open_connection()
    assert b.counters["upstream_cx_overflow"] == 1
    d = b.describe()
    assert d["limits"]["max_connections"] == 5 and d["current"]["connections"] == 1
