"""gRPC helpers: status names and mappings, grpc-timeout, trailers-only replies, message counts."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from diktyo.proxy.codec import grpc


@pytest.mark.parametrize(
    ("ct", "want"),
    [
        ("application/grpc", True),
        ("application/grpc+proto", True),
        ("application/grpc;charset=utf-8", True),
        ("application/grpc-web", False),
        ("application/grpcx", False),
        ("application/json", False),
        (None, False),
    ],
)
def test_is_grpc(ct: str | None, want: bool) -> None:
    assert grpc.is_grpc(ct) is want


def test_status_names_as_istio_writes_them() -> None:
    assert grpc.parse_status("UNAVAILABLE") == 14
    assert grpc.parse_status("unavailable") == 14
    assert grpc.parse_status("14") == 14
    assert grpc.parse_status("NOPE") is None


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("1S", 1.0), ("250m", 0.25), ("2H", 7200.0), ("3M", 180.0), ("5u", 5e-6), ("100n", 1e-7)],
)
def test_grpc_timeout(value: str, seconds: float) -> None:
    assert grpc.grpc_timeout(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["", "S", "1", "1x", "123456789S", "-1S", "1.5S"])
def test_grpc_timeout_malformed(value: str) -> None:
    assert grpc.grpc_timeout(value) is None


def test_effective_timeout_follows_istio() -> None:
    assert grpc.effective_timeout(None, "2S") == 2.0  # no route timeout: the header applies
    assert grpc.effective_timeout(0.0, "2S") == 2.0
    assert grpc.effective_timeout(1.0, "2S") == 1.0  # capped by the route's timeout
    assert grpc.effective_timeout(5.0, "2S") == 2.0
    assert grpc.effective_timeout(5.0, None) == 5.0
    assert grpc.effective_timeout(5.0, "bogus") == 5.0


def test_encode_timeout_round_trips() -> None:
    assert grpc.grpc_timeout(grpc.encode_timeout(1.5)) == pytest.approx(1.5)
    assert grpc.encode_timeout(0.0001) == "1m"


def test_status_mappings_match_envoy() -> None:
    assert [grpc.http_to_grpc_status(s) for s in (400, 401, 403, 404, 429, 502, 503, 504, 500)] == [
        13,
        16,
        7,
        12,
        14,
        14,
        14,
        14,
        2,
    ]
    assert grpc.grpc_to_http_status(14) == 503
    assert grpc.grpc_to_http_status(4) == 504
    assert grpc.grpc_to_http_status(0) == 200


def test_local_reply_is_trailers_only_and_percent_encoded() -> None:
    h = dict(grpc.local_reply(14, "upstream connect error: 100% down\n"))
    assert h[b"content-type"] == b"application/grpc"
    assert h[b"grpc-status"] == b"14"
    assert h[b"grpc-message"] == b"upstream connect error: 100%25 down%0A"
    assert grpc.decode_message(h[b"grpc-message"]) == "upstream connect error: 100% down\n"


def test_status_of_prefers_trailers() -> None:
    assert grpc.status_of([(b"grpc-status", b"0")], [(b"grpc-status", b"13")]) == "13"
    assert grpc.status_of([(b"grpc-status", b"14")], None) == "14"
    assert grpc.status_of([(b"content-type", b"application/grpc")], None) == ""


def _frame(payload: bytes) -> bytes:
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


@given(
    st.lists(st.binary(max_size=40), max_size=8),
    st.lists(st.integers(min_value=1, max_value=7), min_size=1, max_size=50),
)
def test_message_counter_any_split(messages: list[bytes], cuts: list[int]) -> None:
    wire = b"".join(_frame(m) for m in messages)
    c = grpc.MessageCounter()
    i = 0
    k = 0
    while i < len(wire):
        step = cuts[k % len(cuts)]
        c.feed(wire[i : i + step])
        i += step
        k += 1
    assert c.count == len(messages)
