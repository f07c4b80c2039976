"""The host-port check: TIME_WAIT leftovers of a stopped mesh are free, a live listener is not.
Port picks (``free_port``): from diktyo's range below the kernel's ephemeral range, never a
held port, never the same port twice in a row."""

from __future__ import annotations

import socket
import time
from collections import deque
from pathlib import Path

import pytest

from diktyo.platform import ports
from diktyo.platform.ports import RANGE_ENV, free_port, parse_range, port_in_use, port_range


def _time_wait_port() -> int:
    """A port whose only trace is a TIME_WAIT connection (the server side closed first)."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    conn, _ = listener.accept()
    conn.close()  # active close on the server side: (127.0.0.1:port, client) enters TIME_WAIT
    deadline = time.monotonic() + 5
    while client.recv(1) and time.monotonic() < deadline:
        pass
    client.close()
    listener.close()
    return port


def _in_time_wait(port: int) -> bool:
    hexport = f"{port:04X}"
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[1].endswith(":" + hexport) and fields[3] == "06":  # 06 = TIME_WAIT
                return True
    return False


def test_a_port_with_only_time_wait_connections_is_free() -> None:
    port = _time_wait_port()
    assert _in_time_wait(port), "the test needs a TIME_WAIT socket on the port"
    assert not port_in_use(port)
    # and what the check promises holds: a new listener can take it
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()


def test_a_port_with_a_listener_is_in_use() -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert port_in_use(port)
    port = _time_wait_port()
    with socket.socket() as s:  # a TIME_WAIT leftover and a new listener: in use
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()
        assert port_in_use(port)


@pytest.fixture
def fresh_picks(monkeypatch: pytest.MonkeyPatch) -> None:
    """No earlier pick of this process counts as recent."""
    monkeypatch.setattr(ports, "_recent", deque(maxlen=ports._RECENT))


def _ephemeral() -> tuple[int, int]:
    lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    return int(lo), int(hi)


def test_default_picks_are_below_the_ephemeral_range(
    monkeypatch: pytest.MonkeyPatch, fresh_picks: None
) -> None:
    """The kernel hands out ephemeral ports to every bind(0) and outgoing connection on the
    machine: a port picked there and bound seconds later by a sidecar can be taken in between."""
    monkeypatch.delenv(RANGE_ENV, raising=False)
    eph_lo, _ = _ephemeral()
    if eph_lo - ports.DEFAULT_LOW < 1000:
        pytest.skip(f"ephemeral range starts at {eph_lo}: no room below it")
    assert port_range() == (ports.DEFAULT_LOW, eph_lo - 1)
    picks = [free_port() for _ in range(50)]
    assert all(ports.DEFAULT_LOW <= p < eph_lo for p in picks), picks
    assert len(set(picks)) == 50  # none handed out twice while its sidecar may not listen yet
    for p in picks:  # each one really is free
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))


def test_a_held_port_is_never_picked(monkeypatch: pytest.MonkeyPatch, fresh_picks: None) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        monkeypatch.setenv(RANGE_ENV, f"{port}-{port + 1}")
        if port_in_use(port + 1):
            pytest.skip(f"{port + 1} is taken on this machine")
        assert free_port() == port + 1


def test_a_range_is_used_up_before_a_port_repeats(
    monkeypatch: pytest.MonkeyPatch, fresh_picks: None
) -> None:
    eph_lo, _ = _ephemeral()
    base = next(  # from the top down: other runs' picks start at the bottom of their slices
        (b for b in range(eph_lo - 3, ports.DEFAULT_LOW, -7)
         if not any(port_in_use(p) for p in (b, b + 1, b + 2))),
        None,
    )  # fmt: skip
    if base is None:
        pytest.skip("no three free ports below the ephemeral range")
    monkeypatch.setenv(RANGE_ENV, f"{base}-{base + 2}")
    picks = [free_port() for _ in range(3)]
    assert sorted(picks) == [base, base + 1, base + 2], picks
    # all three picked and (as far as this process knows) not bound yet: the kernel picks
    assert free_port() >= eph_lo


def test_a_bad_range_says_what_is_expected(monkeypatch: pytest.MonkeyPatch) -> None:
    for bad in ("20000", "x-y", "30000-20000", "80-90", "60000-70000"):
        with pytest.raises(ValueError, match=f"{RANGE_ENV}=.*expected LOW-HIGH"):
            parse_range(bad)
    monkeypatch.setenv(RANGE_ENV, "20000:21000")
    with pytest.raises(ValueError, match=RANGE_ENV):
        free_port()
    assert parse_range("20000-20999") == (20000, 20999)


def test_no_room_below_the_ephemeral_range_lets_the_kernel_pick(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(RANGE_ENV, raising=False)
    fake = tmp_path / "ip_local_port_range"
    fake.write_text("15000\t60999\n")
    monkeypatch.setattr(ports, "_EPHEMERAL", fake)
    assert port_range() is None
    assert free_port() >= _ephemeral()[0]  # the kernel's own pick, from its ephemeral range
