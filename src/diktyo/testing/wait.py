"""Waiting in tests: poll a condition until it holds or a deadline passes, instead of sleeping.

``await eventually(check)`` calls ``check()`` (a plain function or a coroutine function) every
``interval`` seconds until it returns something truthy, and returns that value. At the deadline
it raises ``AssertionError`` saying what was awaited and what ``check`` returned (or raised)
last. Exceptions listed in ``ignore`` mean "not yet" (a port that does not answer yet);
any other exception fails at once. ``what`` names the condition in that message; give a function
to have it evaluated at the deadline (a process log tail, say). ``eventually_sync`` is the same for tests without a running loop.

Real time on purpose: these wait for real processes and sockets. Code under test takes a clock.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

DEFAULT_TIMEOUT = 10.0
DEFAULT_INTERVAL = 0.05


Describe = str | Callable[[], str]


def _failure(
    what: Describe, timeout: float, last: object, error: BaseException | None
) -> AssertionError:
    name = (what() if callable(what) else what) or "condition"
    if error is not None:
        seen = f"last attempt raised {type(error).__name__}: {error}"
    else:
        seen = f"last result: {last!r}"
    return AssertionError(f"{name} did not hold within {timeout:g} s ({seen})")


async def eventually(
    check: Callable[[], T] | Callable[[], Awaitable[T]],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    interval: float = DEFAULT_INTERVAL,
    ignore: tuple[type[BaseException], ...] = (),
    what: Describe = "",
) -> T:
    """Poll ``check()`` until it returns a truthy value and return it; fail at ``timeout``."""
    deadline = time.monotonic() + timeout
    last: object = None
    error: BaseException | None = None
    while True:
        try:
            result = check()
            if inspect.isawaitable(result):
                result = await result
        except ignore as exc:
            error = exc
        else:
            if result:
                return result
            last, error = result, None
        if time.monotonic() >= deadline:
            raise _failure(what, timeout, last, error) from error
        await asyncio.sleep(interval)


def eventually_sync(
    check: Callable[[], T],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    interval: float = DEFAULT_INTERVAL,
    ignore: tuple[type[BaseException], ...] = (),
    what: Describe = "",
) -> T:
    """``eventually`` for tests without an event loop (runs it on a loop of its own)."""
    return asyncio.run(
        eventually(check, timeout=timeout, interval=interval, ignore=ignore, what=what)
    )
