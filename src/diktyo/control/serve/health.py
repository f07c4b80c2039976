"""Health checking of registered instances through their sidecar's admin ``/ready``.

Sans-I/O ``HealthTracker`` counts consecutive results per instance (unhealthy after
``unhealthy_threshold`` failures, healthy again after ``healthy_threshold`` successes, like
Kubernetes probes); the checker loop in ``diktyo.control.server`` does the HTTP calls.
"""

from __future__ import annotations


class HealthTracker:
    def __init__(self, unhealthy_threshold: int = 2, healthy_threshold: int = 1) -> None:
        self.unhealthy_threshold = unhealthy_threshold
        self.healthy_threshold = healthy_threshold
        self._fails: dict[str, int] = {}
        self._oks: dict[str, int] = {}

    def observe(self, name: str, ok: bool, healthy_now: bool) -> bool | None:
        """Record one probe; return the new health if it should change, else None."""
        if ok:
            self._fails[name] = 0
            self._oks[name] = self._oks.get(name, 0) + 1
            if not healthy_now and self._oks[name] >= self.healthy_threshold:
                return True
        else:
            self._oks[name] = 0
            self._fails[name] = self._fails.get(name, 0) + 1
            if healthy_now and self._fails[name] >= self.unhealthy_threshold:
                return False
        return None

    def forget(self, name: str) -> None:
        self._fails.pop(name, None)
        self._oks.pop(name, None)
