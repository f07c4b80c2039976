"""Kubernetes' CrashLoopBackOff delays (no I/O: the supervisor and the keeper use it)."""

from __future__ import annotations


class BackOff:
    """Kubernetes' CrashLoopBackOff for one container.

    The first restart is immediate; each further one waits ``base`` seconds, doubling up to
    ``cap``. A container that ran at least ``reset_after`` seconds before it exited starts the
    series again (its next restart is immediate).
    """

    def __init__(self, base: float = 10.0, cap: float = 300.0, reset_after: float = 600.0):
        self.base = base
        self.cap = cap
        self.reset_after = reset_after
        self.failures = 0  # exits counted since the last reset

    def next_delay(self, ran_for: float) -> float:
        """Seconds to wait before restarting a container that ran ``ran_for`` seconds."""
        if ran_for >= self.reset_after:
            self.failures = 0
        delay = 0.0 if self.failures == 0 else min(self.cap, self.base * 2 ** (self.failures - 1))
        self.failures += 1
        return delay


__all__ = ["BackOff"]
