"""Outlier detection: eject hosts that keep failing (Istio OutlierDetection, Envoy's algorithm).

Theory of operation
-------------------
``record()`` runs inline for every finished request, as Envoy's consecutive-error detectors do:

- a 5xx response, a reset or a connect failure (``status None``; Envoy maps local-origin
  errors to 503) adds one to ``consecutive_5xx``; 502/503/504 and local-origin errors also add
  one to ``consecutive_gateway``; a 5xx that is not a gateway error resets the gateway count;
  any other status resets both.
- reaching ``consecutive5xxErrors`` (default 5, 0 disables) or ``consecutiveGatewayErrors``
  (unset/0 disables) tries to eject the host and resets that counter.
- ``maxEjectionPercent`` (default 10): the host is ejected only if
  ``100 * (ejected + 1) / hosts <= maxEjectionPercent``. This is Envoy's rule since 1.28
  (envoyproxy/envoy#27909): the old "at least one host is always ejected" exception is now the
  opt-in ``always_eject_one_host``, which Istio does not set -- so with the default 10 % a
  cluster of fewer than 10 endpoints never ejects. Refused ejections count
  ``ejections_overflow``.
- ejection lasts ``baseEjectionTime x multiplier`` (capped at Envoy's ``max_ejection_time``,
  300 s; Istio does not expose it). The multiplier grows by one per ejection and shrinks by one
  for every ``interval`` the host stays healthy after coming back.
- Envoy un-ejects only when its interval timer fires, so a host comes back at the first
  interval tick at or after ``ejected_at + ejection time``. The detector's ticks are at
  ``start + k * interval``; ``Host.ejected_until`` is set to that tick, so availability needs
  no call to ``tick()``. ``tick()`` does the interval bookkeeping (clearing ejection state,
  resetting counters, decrementing multipliers) when a tick time has passed.

``minHealthPercent`` is Envoy's panic threshold and is applied by ``ClusterState``: when fewer
than that percentage of hosts are available, the load balancer uses all hosts.
"""

from __future__ import annotations

import math
from typing import Any

from diktyo.core.clock import Clock
from diktyo.proxy.upstream.host import Host
from diktyo.snapshot.model import OutlierDetection

MAX_EJECTION_TIME = 300.0  # Envoy's default max_ejection_time; Istio does not set it
_EPS = 1e-9

COUNTER_NAMES = (
    "ejections_total",
    "ejections_enforced_total",
    "ejections_overflow",
    "ejections_enforced_consecutive_5xx",
    "ejections_detected_consecutive_5xx",
    "ejections_enforced_consecutive_gateway_failure",
    "ejections_detected_consecutive_gateway_failure",
    "unejections_total",
)


class OutlierDetector:
    """Consecutive-5xx and consecutive-gateway-error ejection for one cluster."""

    __slots__ = (
        "_start",
        "always_eject_one_host",
        "base_ejection_time",
        "cfg",
        "clock",
        "counters",
        "generation",
        "interval",
        "max_ejection_percent",
        "max_ejection_time",
        "next_tick",
        "threshold_5xx",
        "threshold_gateway",
    )

    def __init__(
        self, cfg: OutlierDetection, clock: Clock, *, always_eject_one_host: bool = False
    ) -> None:
        self.clock = clock
        self.always_eject_one_host = always_eject_one_host
        self.counters: dict[str, int] = dict.fromkeys(COUNTER_NAMES, 0)
        # bumped on every ejection / un-ejection: states sharing this detector (old and new
        # snapshots) rebuild their available-host lists when it changes
        self.generation = 0
        self._start = clock.monotonic()
        self.interval = 0.0
        self.next_tick = 0.0
        self.update(cfg)

    def update(self, cfg: OutlierDetection) -> None:
        """New settings from a new snapshot; host state is kept."""
        self.cfg = cfg
        c5 = cfg.consecutive_5xx_errors
        cg = cfg.consecutive_gateway_errors
        self.threshold_5xx = c5 if c5 is not None and c5 > 0 else 0
        self.threshold_gateway = cg if cg is not None and cg > 0 else 0
        old_interval = self.interval
        self.interval = cfg.interval if cfg.interval > 0 else 10.0
        self.base_ejection_time = cfg.base_ejection_time if cfg.base_ejection_time > 0 else 30.0
        self.max_ejection_time = max(MAX_EJECTION_TIME, self.base_ejection_time)
        self.max_ejection_percent = min(100.0, max(0.0, cfg.max_ejection_percent))
        if old_interval == self.interval:
            return  # same interval: keep the tick grid, so ejection end times stay exact
        now = self.clock.monotonic()
        self._start = now
        self.next_tick = now + self.interval

    def _tick_at_or_after(self, t: float) -> float:
        """The first interval tick time >= t."""
        k = math.ceil((t - self._start) / self.interval - _EPS)
        return self._start + max(k, 1) * self.interval

    # -- per request
    def record(
        self, host: Host, status: int | None, gateway_error: bool, hosts: list[Host]
    ) -> bool:
        """Account one finished request to ``host``; True if that ejected the host.

        ``status`` None means no response (reset, connect failure, timeout);
        ``gateway_error`` marks a locally generated gateway error (e.g. 503 after a connect
        failure) -- both count as 5xx and as gateway errors.
        """
        if status is None or gateway_error:
            is_gw = True
        elif status >= 500:
            is_gw = status == 502 or status == 503 or status == 504
        else:
            host.consecutive_5xx = 0
            host.consecutive_gateway = 0
            return False
        if is_gw:
            host.consecutive_gateway += 1
        else:
            host.consecutive_gateway = 0
        host.consecutive_5xx += 1
        ejected = False
        tg = self.threshold_gateway
        if is_gw and tg and host.consecutive_gateway >= tg:
            host.consecutive_gateway = 0
            self.counters["ejections_detected_consecutive_gateway_failure"] += 1
            if self._eject(host, hosts):
                self.counters["ejections_enforced_consecutive_gateway_failure"] += 1
                ejected = True
        t5 = self.threshold_5xx
        if t5 and host.consecutive_5xx >= t5:
            host.consecutive_5xx = 0
            self.counters["ejections_detected_consecutive_5xx"] += 1
            if not ejected and self._eject(host, hosts):
                self.counters["ejections_enforced_consecutive_5xx"] += 1
                ejected = True
        return ejected

    def _eject(self, host: Host, hosts: list[Host]) -> bool:
        now = self.clock.monotonic()
        if host.ejected_until > now:
            return False  # already ejected
        ejected = 0
        for h in hosts:
            if h.ejected_until > now:
                ejected += 1
        total = len(hosts) or 1
        if 100.0 * (ejected + 1) / total > self.max_ejection_percent + _EPS and not (
            self.always_eject_one_host and ejected == 0
        ):
            self.counters["ejections_overflow"] += 1
            return False
        base = self.base_ejection_time
        if host.eject_multiplier * base < self.max_ejection_time + base:
            host.eject_multiplier += 1
        duration = min(base * host.eject_multiplier, self.max_ejection_time)
        host.ejected_at = now
        host.ejected_until = self._tick_at_or_after(now + duration)
        host.ejection_count += 1
        self.generation += 1
        self.counters["ejections_total"] += 1
        self.counters["ejections_enforced_total"] += 1
        return True

    # -- periodic
    def tick(self, hosts: list[Host]) -> bool:
        """Run the interval work if an interval tick has passed; True if a host came back."""
        now = self.clock.monotonic()
        if now + _EPS < self.next_tick:
            return False
        # next tick strictly after now, on the start + k*interval grid
        k = math.floor((now - self._start) / self.interval + _EPS) + 1
        self.next_tick = self._start + k * self.interval
        changed = False
        interval = self.interval
        for h in hosts:
            if h.ejected_until > 0.0:
                if h.ejected_until <= now + _EPS:
                    h.ejected_until = 0.0
                    h.consecutive_5xx = 0
                    h.consecutive_gateway = 0
                    h.last_unejected_at = now
                    self.counters["unejections_total"] += 1
                    changed = True
            elif (
                h.eject_multiplier > 0
                and h.last_unejected_at is not None
                and now - h.last_unejected_at + _EPS >= interval
            ):
                h.eject_multiplier -= 1
        if changed:
            self.generation += 1
        return changed

    def ejected_count(self, hosts: list[Host]) -> int:
        now = self.clock.monotonic()
        return sum(1 for h in hosts if h.ejected_until > now)

    def describe(self, hosts: list[Host]) -> dict[str, Any]:
        return {
            "consecutive_5xx_errors": self.threshold_5xx,
            "consecutive_gateway_errors": self.threshold_gateway,
            "interval": self.interval,
            "base_ejection_time": self.base_ejection_time,
            "max_ejection_percent": self.max_ejection_percent,
            "min_health_percent": self.cfg.min_health_percent,
            "ejections_active": self.ejected_count(hosts),
            "counters": dict(self.counters),
        }
