"""Observability: the embedded metric and trace stores, scraping the sidecars, the telemetry
API (``/telemetry``), and the data the dashboard reads.

The control plane scrapes every sidecar's admin ``/stats/prometheus`` into ``metrics`` (a
``MetricStore``); sidecars export spans to ``/telemetry/v1/traces`` (``traces``). The dashboard
(``diktyo.dashboard``, which the control plane never imports) mounts itself on the API
application and reads ``metric_source`` (the embedded store, or Prometheus with
``--prometheus``), ``traces``, ``config()`` and ``resilience()``.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from diktyo.control.store import resource_key

if TYPE_CHECKING:
    from diktyo.control.server import ControlPlane
    from diktyo.telemetry.scrape import Scraper

log = logging.getLogger(__name__)


class Observability:
    def __init__(
        self, cp: ControlPlane, scrape_interval: float = 5.0, prometheus_url: str | None = None
    ) -> None:
        from diktyo.telemetry.store import MetricStore, TraceStore  # only with observability on

        self.cp = cp
        self.scrape_interval = scrape_interval
        self.metrics = MetricStore()
        self.traces = TraceStore()
        # the dashboard reads graph/series from this Prometheus instead of the embedded store
        # ('--prometheus URL'; $DIKTYO_PROMETHEUS lets 'diktyo up' pass it to its mesh)
        self.prometheus_url = prometheus_url or os.environ.get("DIKTYO_PROMETHEUS") or None
        self.metric_source: Any = self.metrics  # what the dashboard reads
        if self.prometheus_url:
            from diktyo.telemetry.prometheus_source import PrometheusSource

            self.metric_source = PrometheusSource(self.prometheus_url)
        self.scraper: Scraper | None = None
        self._session: aiohttp.ClientSession | None = None

    def mount(self, app: web.Application) -> None:
        """The telemetry API and OTLP receiver under ``/telemetry``."""
        from diktyo.telemetry.http import setup_routes

        telemetry = web.Application(client_max_size=16 * 1024 * 1024)
        setup_routes(telemetry, self.metrics, self.traces)
        app.add_subapp("/telemetry", telemetry)

    def mtls_edge(self, source_id: str, target_id: str) -> bool:
        """Whether the calls of this graph edge were seen over mTLS (when the source knows)."""
        check = getattr(self.metric_source, "mtls_edge", None)
        return bool(check and check(source_id, target_id))

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        from diktyo.telemetry.scrape import Scraper

        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0))
        admin_urls = self.cp.admin_urls
        self.scraper = Scraper(
            self.metrics,
            lambda: [(n, u + "/stats/prometheus") for n, u in admin_urls.items()],
            interval=self.scrape_interval,
        )
        self.scraper.start()

    async def stop(self) -> None:
        if self.scraper is not None:
            await self.scraper.close()
            self.scraper = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    def close(self) -> None:
        """Release the trace store once the control plane will not be started again."""
        self.traces.close()

    # ------------------------------------------------------------------ the dashboard's data

    async def resilience(self) -> list[dict[str, Any]]:
        """Breaker and outlier state of every used outbound cluster of every sidecar (admin
        ``/clusters``)."""
        cp = self.cp
        targets = [(n, u) for n, u in cp.admin_urls.items() if n in cp.proxies]
        session = self._session

        async def fetch(url: str) -> Any:
            if session is None:
                return None
            try:
                async with session.get(url + "/clusters") as resp:
                    return await resp.json(content_type=None) if resp.status == 200 else None
            except (aiohttp.ClientError, TimeoutError, OSError, ValueError):
                return None

        answers = await asyncio.gather(*(fetch(u) for _, u in targets))
        cards: list[dict[str, Any]] = []
        for (node_id, _), body in zip(targets, answers, strict=True):
            if isinstance(body, dict) and node_id in cp.proxies:
                cards += _cards(node_id, cp.proxies[node_id].node.workload, body)
        return cards

    def config(self) -> dict[str, Any]:
        """Resources (kind, namespace, name, file, line), findings and store errors, and
        which replica answers (etcd store; one for embedded)."""
        cp = self.cp
        resources = []
        for res in cp.store.resources:
            kind, ns, name = resource_key(res)
            resources.append(
                {
                    "kind": kind,
                    "namespace": ns,
                    "name": name,
                    "file": getattr(res, "file", ""),
                    "line": getattr(res, "line", 0),
                }
            )
        messages = [
            m.to_json()
            if hasattr(m, "to_json")
            else {"file": "", "line": 0, "column": 0, "severity": "error", "message": str(m)}
            for m in cp.push.findings_raw
        ]
        for err in [*cp.store.errors, *(e for es in cp.store.source_errors.values() for e in es)]:
            messages.append(
                {"file": "", "line": 0, "column": 0, "severity": "error", "message": err}
            )
        return {
            "resources": resources,
            "messages": messages,
            "control_plane": cp.backend.describe(),
        }


def _cards(node_id: str, workload: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """One card per used outbound cluster of one sidecar's admin ``/clusters`` answer."""
    cards: list[dict[str, Any]] = []
    for c in body.get("clusters", []):
        if not str(c.get("name", "")).startswith("outbound|"):
            continue
        cb = c.get("circuit_breaker") or {}
        limits, cur = cb.get("limits", {}), cb.get("current", {})
        hosts = c.get("hosts", [])
        counters = {k: v for k, v in (cb.get("counters") or {}).items() if v}
        used = (
            c.get("active_requests")
            or counters
            or any(v for v in (c.get("counters") or {}).values())
            or any(h.get("ejected") or h.get("active_requests") for h in hosts)
        )
        if not used:
            continue
        cards.append(
            {
                "node": node_id,
                "workload": workload,
                "cluster": c["name"],
                "breaker": {
                    "connections": cur.get("connections", 0),
                    "max_connections": limits.get("max_connections"),
                    "pending": cur.get("pending", 0),
                    "max_pending": limits.get("max_pending_requests"),
                    "requests": cur.get("requests", 0),
                    "max_requests": limits.get("max_requests"),
                    "retries": cur.get("retries", 0),
                    "max_retries": limits.get("max_retries"),
                },
                "overflows": counters,
                "hosts": [
                    {
                        "address": f"{h.get('address')}:{h.get('port')}",
                        "ejected": bool(h.get("ejected")),
                        "active": h.get("active_requests", 0),
                    }
                    for h in hosts
                ],
            }
        )
    return cards
