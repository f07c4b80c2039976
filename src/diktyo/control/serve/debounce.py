"""Debouncer: coalesce bursts of config/registry changes into one push, like istiod.

Theory of operation
-------------------
Sans-I/O. ``change(now)`` records an event. ``due(now)`` says whether a push should happen:
when nothing changed for ``quiet`` seconds (istiod's ``PILOT_DEBOUNCE_AFTER``, 100 ms) or
when the first pending change is ``max_wait`` seconds old (``PILOT_DEBOUNCE_MAX``, 10 s), so a
steady stream of changes cannot starve pushes. ``deadline()`` tells the shell when to look
again. ``fire()`` clears the pending state and returns how many changes were merged.
"""

from __future__ import annotations


class Debouncer:
    __slots__ = ("_count", "_first", "_last", "max_wait", "quiet")

    def __init__(self, quiet: float = 0.1, max_wait: float = 10.0) -> None:
        self.quiet = quiet
        self.max_wait = max_wait
        self._first: float | None = None
        self._last = 0.0
        self._count = 0

    @property
    def pending(self) -> bool:
        return self._first is not None

    def change(self, now: float) -> None:
        if self._first is None:
            self._first = now
        self._last = now
        self._count += 1

    def deadline(self) -> float | None:
        """Monotonic time at which the pending push becomes due (None: nothing pending)."""
        if self._first is None:
            return None
        return min(self._last + self.quiet, self._first + self.max_wait)

    def due(self, now: float) -> bool:
        deadline = self.deadline()
        return deadline is not None and now >= deadline

    def fire(self) -> int:
        merged = self._count
        self._first = None
        self._count = 0
        return merged
