"""Regression: ``ControlPlane.stop()`` right after a change must not hang.

The push loop waits for more changes during the debounce; a stop that cancels it in the same
loop iteration as a new change arrives was swallowed by Python 3.11's ``asyncio.wait_for``
(the inner wait had just completed), the loop went on, and ``stop()`` waited for it forever.
"""

from __future__ import annotations

import asyncio

from diktyo.control.server import ControlPlane


async def test_stop_right_after_a_change_returns() -> None:
    cp = ControlPlane(observability=False, debounce=0.5)
    await cp.start()
    cp.kick()
    await asyncio.sleep(0.05)  # real time: the push loop now waits out the debounce
    cp.kick()  # a change and the stop in the same loop iteration
    await asyncio.wait_for(cp.stop(), 5)
