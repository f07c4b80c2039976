"""diktyo.testing.wait: poll until a condition holds, fail at a deadline with what was seen."""

from __future__ import annotations

import socket
from collections.abc import Callable

import pytest

from diktyo.testing import eventually, eventually_sync, free_port


def counter(ready_after: int) -> tuple[list[int], Callable[[], int]]:
    calls: list[int] = []

    def check() -> int:
        calls.append(1)
        return len(calls) if len(calls) >= ready_after else 0

    return calls, check


async def test_returns_the_first_truthy_value() -> None:
    calls, check = counter(3)
    assert await eventually(check, interval=0.001) == 3
    assert len(calls) == 3


async def test_awaits_coroutine_checks() -> None:
    seen: list[int] = []

    async def check() -> str | None:
        seen.append(1)
        return "up" if len(seen) == 2 else None

    assert await eventually(check, interval=0.001) == "up"


async def test_deadline_fails_with_what_and_the_last_result() -> None:
    with pytest.raises(AssertionError, match=r"backend healthy did not hold.*last result: \[\]"):
        await eventually(list, timeout=0.05, interval=0.01, what="backend healthy")


async def test_ignored_exceptions_mean_not_yet_and_are_reported() -> None:
    attempts: list[int] = []

    def check() -> bool:
        attempts.append(1)
        if len(attempts) < 3:
            raise ConnectionRefusedError("not listening yet")
        return True

    assert await eventually(check, interval=0.001, ignore=(OSError,)) is True
    with pytest.raises(AssertionError, match="ConnectionRefusedError: nope") as info:
        await eventually(_refuse, timeout=0.05, interval=0.01, ignore=(OSError,))
    assert isinstance(info.value.__cause__, ConnectionRefusedError)


def _refuse() -> bool:
    raise ConnectionRefusedError("nope")


async def test_other_exceptions_fail_at_once() -> None:
    calls: list[int] = []

    def check() -> bool:
        calls.append(1)
        raise KeyError("boom")

    with pytest.raises(KeyError):
        await eventually(check, timeout=5.0, ignore=(OSError,))
    assert len(calls) == 1


def test_sync_variant() -> None:
    calls, check = counter(2)
    assert eventually_sync(check, interval=0.001) == 2
    assert len(calls) == 2
    with pytest.raises(AssertionError, match="did not hold within"):
        eventually_sync(lambda: 0, timeout=0.03, interval=0.01)


def test_free_port_is_bindable_on_loopback() -> None:
    port = free_port()
    assert 0 < port < 65536
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
