"""Host: one endpoint of one cluster and its mutable runtime state (load, health, ejection).

A ``Host`` outlives snapshots: when a new snapshot keeps an endpoint with the same
``(address, port)`` the new ``ClusterState`` reuses the very same object, so in-flight request
counts and outlier-ejection state carry over.

Ejection fields (written by ``OutlierDetector``):

- ``ejected_until``: monotonic time from which the host may be used again; ``0.0`` when the
  host is not ejected. The detector sets it to the first outlier-interval tick at or after
  ``ejected_at + base_ejection_time x multiplier`` (Envoy un-ejects only on its interval
  timer), so ``available(now)`` needs no tick to become true again.
- ``ejection_count``: total ejections of this host (Envoy's ``num_ejections``).
- ``eject_multiplier``: Envoy's ``ejectTimeBackoff``: +1 per ejection, -1 per interval the host
  stays healthy after un-ejection; ejection time is ``base x eject_multiplier`` (max 300 s).
"""

from __future__ import annotations

from typing import Any

from diktyo.snapshot.model import Endpoint


class HostStats:
    """Per-host request counters (plain integer increments on the hot path)."""

    __slots__ = ("rq_error", "rq_reset", "rq_success", "rq_total")

    def __init__(self) -> None:
        self.rq_total = 0  # requests finished
        self.rq_success = 0  # finished with a status < 500
        self.rq_error = 0  # 5xx (incl. gateway errors) or reset / connect failure
        self.rq_reset = 0  # no status at all: reset / connect failure / timeout

    def as_dict(self) -> dict[str, int]:
        return {
            "rq_total": self.rq_total,
            "rq_success": self.rq_success,
            "rq_error": self.rq_error,
            "rq_reset": self.rq_reset,
        }


class Host:
    """One endpoint of one cluster, with mutable runtime state."""

    __slots__ = (  # the contract's slots plus weight, ejected_at, eject_multiplier, ...
        "active_requests",
        "address",
        "consecutive_5xx",
        "consecutive_gateway",
        "eject_multiplier",
        "ejected_at",
        "ejected_until",
        "ejection_count",
        "endpoint",
        "healthy",
        "key",
        "last_unejected_at",
        "port",
        "stats",
        "weight",
    )

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.address = endpoint.address
        self.port = endpoint.port
        self.key: tuple[str, int] = (endpoint.address, endpoint.port)
        self.weight = endpoint.weight if endpoint.weight > 0 else 1
        self.active_requests = 0
        self.ejected_until = 0.0
        self.ejected_at = 0.0
        self.ejection_count = 0
        self.eject_multiplier = 0
        self.last_unejected_at: float | None = None
        self.consecutive_5xx = 0
        self.consecutive_gateway = 0
        self.healthy = True
        self.stats = HostStats()

    def update(self, endpoint: Endpoint) -> None:
        """Take the new snapshot's endpoint (labels, weight) for the same address and port."""
        self.endpoint = endpoint
        self.weight = endpoint.weight if endpoint.weight > 0 else 1

    def available(self, now: float) -> bool:
        """Healthy and not (or no longer) ejected by outlier detection."""
        return self.healthy and self.ejected_until <= now

    def is_ejected(self, now: float) -> bool:
        return self.ejected_until > now

    def describe(self, now: float) -> dict[str, Any]:
        return {
            "address": self.address,
            "port": self.port,
            "weight": self.weight,
            "healthy": self.healthy,
            "ejected": self.ejected_until > now,
            "ejected_for": max(0.0, self.ejected_until - now),
            "ejection_count": self.ejection_count,
            "active_requests": self.active_requests,
            "consecutive_5xx": self.consecutive_5xx,
            "consecutive_gateway": self.consecutive_gateway,
            "labels": dict(self.endpoint.labels),
            **self.stats.as_dict(),
        }

    def __repr__(self) -> str:
        return f"Host({self.address}:{self.port})"
