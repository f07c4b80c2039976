"""A metric source backed by a real Prometheus server (``diktyo control-plane --prometheus URL``).

Theory of operation
-------------------
:class:`PrometheusSource` answers the two questions the dashboard asks of the embedded
:class:`~diktyo.telemetry.store.MetricStore` — ``graph(window)`` and ``series(match, window)``
— with the same shapes, by running PromQL over Istio's metric names against Prometheus' HTTP
API (``/api/v1/query`` for the graph, ``/api/v1/query_range`` for series):

- request counts and code classes: ``sum by (<edge labels>, response_code)
  (increase(istio_requests_total[W]))``;
- latency: ``histogram_quantile(q, sum by (<edge labels>, le)
  (rate(istio_request_duration_milliseconds_bucket[W])))`` for q = 0.5, 0.95, 0.99;
- mean latency and TCP byte rates from ``..._sum`` and ``istio_tcp_*_bytes_total``.

The PromQL text (built by :mod:`diktyo.telemetry.promql`, as the Grafana dashboards are) and
the folding of answers into the store's shapes (``store.golden_signals`` and
``store.service_graph``, the same fold as the embedded store's) are pure functions
(:func:`graph_queries`, :func:`fold_graph`, :func:`series_queries`, :func:`fold_series`). The
class adds asynchronous HTTP (aiohttp, the control side's one client: the queries of one
answer run concurrently and never block the control plane's event loop; short timeout) and a
short cache so a dashboard polling every few seconds asks once. ``graph`` and ``series`` are
coroutines; callers await them (``MetricStore``'s are plain functions, the dashboard takes
both). When Prometheus cannot be reached or answers an error, the source logs a warning,
counts it in ``failures`` and answers an empty graph / empty points (the dashboard shows "no
traffic" rather than failing); for ``backoff`` seconds after a failure it does not ask again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from diktyo.core.clock import SYSTEM_CLOCK, Clock
from diktyo.telemetry import promql
from diktyo.telemetry.promql import selector
from diktyo.telemetry.store import EDGE_LABELS, code_class, golden_signals, is_error, service_graph

log = logging.getLogger(__name__)

QUANTILES = (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))

Fetch = Callable[[str], Awaitable[Any]]  # URL -> parsed JSON body of a Prometheus API answer
promql_string = promql.string  # kept for callers of the old name
__all__ = ["PrometheusError", "PrometheusSource", "fold_graph", "fold_series", "graph_queries",
           "promql_string", "selector", "series_queries"]  # fmt: skip


class PrometheusError(RuntimeError):
    """Prometheus could not be reached or rejected a query."""


def _duration(seconds: float) -> str:
    return f"{max(1, math.ceil(seconds))}s"


def _num(raw: Any) -> float | None:
    try:
        v = float(raw)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


# --------------------------------------------------------------------------- graph (pure)


def graph_queries(window: float) -> dict[str, str]:
    """The instant PromQL queries behind ``graph(window)``, by name."""
    w = _duration(window)
    by = EDGE_LABELS
    q = {
        "requests": promql.sum_by(promql.rate(promql.REQUESTS, "", w, "increase"),
                                  (*by, "response_code")),
        "duration_sum": promql.sum_by(promql.rate(promql.DURATION + "_sum", "", w, "increase"), by),
        "tcp_sent": promql.sum_by(promql.rate(promql.TCP_SENT, "", w), by),
        "tcp_received": promql.sum_by(promql.rate(promql.TCP_RECEIVED, "", w), by),
    }  # fmt: skip
    for name, quant in QUANTILES:
        q[name] = promql.quantile(quant, promql.DURATION, "", w, by)
    return q


def _edge(metric: Mapping[str, str]) -> tuple[str, ...]:
    return tuple(metric.get(n, "unknown") or "unknown" for n in EDGE_LABELS)


def _empty_stats() -> dict[str, Any]:
    return {"requests": 0.0, "errors": 0.0, "codes": {}, "p50": None, "p95": None, "p99": None,
            "duration_sum": 0.0, "tcp_sent": 0.0, "tcp_received": 0.0}  # fmt: skip


def _summary(s: Mapping[str, Any], seconds: float) -> dict[str, Any]:
    return golden_signals(
        seconds, s["requests"], s["errors"], s["codes"], (s["p50"], s["p95"], s["p99"]),
        s["duration_sum"], s["tcp_sent"], s["tcp_received"],
    )  # fmt: skip


def fold_graph(window: float, answers: Mapping[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """``MetricStore.graph`` shape from the instant-vector answers of :func:`graph_queries`:
    per-edge numbers here, the graph itself by ``store.service_graph`` (one fold for both)."""
    span = float(max(1, math.ceil(window)))
    per_edge: dict[tuple[str, ...], dict[str, Any]] = {}

    def stats(metric: Mapping[str, str]) -> dict[str, Any]:
        key = _edge(metric)
        s = per_edge.get(key)
        if s is None:
            s = per_edge[key] = _empty_stats()
        return s

    for r in answers.get("requests", []):
        v = _num(r["value"][1])
        if not v:
            continue
        s = stats(r["metric"])
        code = r["metric"].get("response_code", "")
        s["requests"] += v
        cls = code_class(code)
        s["codes"][cls] = s["codes"].get(cls, 0.0) + v
        if is_error(code):
            s["errors"] += v
    for name in ("duration_sum", "tcp_sent", "tcp_received", "p50", "p95", "p99"):
        for r in answers.get(name, []):
            v = _num(r["value"][1])
            if v is None:
                continue
            key = _edge(r["metric"])
            if name.startswith("p") and key not in per_edge:
                continue  # a quantile of an edge with no requests in the window
            if not v and key not in per_edge:
                continue
            stats(r["metric"])[name] = v
    return service_graph(span, {k: _summary(s, span) for k, s in per_edge.items()})


# --------------------------------------------------------------------------- series (pure)


def series_queries(match: Mapping[str, str], reporter: str, rate_window: float) -> dict[str, str]:
    """The range PromQL queries behind ``series(match, window)``, by name."""
    unknown = [k for k in match if k not in EDGE_LABELS or k == "reporter"]
    if unknown:
        raise ValueError(f"unknown filter {unknown[0]!r}; use one of {', '.join(EDGE_LABELS[1:])}")
    sel = selector({**match, "reporter": reporter})
    r = _duration(rate_window)
    q = {
        "codes": promql.sum_by(promql.rate(promql.REQUESTS, sel, r), ("response_code",)),
        "duration_sum": promql.sum_by(promql.rate(promql.DURATION + "_sum", sel, r)),
        "tcp_sent": promql.sum_by(promql.rate(promql.TCP_SENT, sel, r)),
        "tcp_received": promql.sum_by(promql.rate(promql.TCP_RECEIVED, sel, r)),
    }
    for name, quant in QUANTILES:
        q[name] = promql.quantile(quant, promql.DURATION, sel, r)
    return q


def fold_series(
    start: float, end: float, step: float, answers: Mapping[str, list[dict[str, Any]]]
) -> list[dict[str, Any]]:
    """``MetricStore.series`` points (one per ``step``) from range-vector answers."""
    n = int((end - start) // step) + 1
    times = [start + i * step for i in range(n)]
    slot = {round(t, 3): i for i, t in enumerate(times)}
    acc = [_empty_stats() for _ in times]
    for name in ("codes", "duration_sum", "tcp_sent", "tcp_received", "p50", "p95", "p99"):
        for r in answers.get(name, []):
            code = r.get("metric", {}).get("response_code", "")
            for t, raw in r.get("values", []):
                i = slot.get(round(float(t), 3))
                v = _num(raw)
                if i is None or v is None:
                    continue
                s = acc[i]
                if name == "codes":
                    rq = v * step  # a rate per second -> requests in this step
                    s["requests"] += rq
                    cls = code_class(code)
                    s["codes"][cls] = s["codes"].get(cls, 0.0) + rq
                    if is_error(code):
                        s["errors"] += rq
                elif name == "duration_sum":
                    s[name] += v * step
                else:
                    s[name] = v
    return [{"t": t, **_summary(s, step)} for t, s in zip(times, acc, strict=True)]


# --------------------------------------------------------------------------- the source


def _aiohttp_fetch(timeout: float) -> Fetch:
    """GET a Prometheus API URL with aiohttp (the control side's one HTTP client)."""

    async def fetch(url: str) -> Any:
        import aiohttp  # the control plane has it loaded already; keep module import light

        base = url.split("/api/")[0]
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http,
                http.get(url) as resp,
            ):
                body = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            reason = str(exc) or type(exc).__name__
            raise PrometheusError(f"cannot reach Prometheus at {base}: {reason}") from None
        if status >= 400:
            try:
                err = json.loads(body).get("error", "")
            except (ValueError, AttributeError):
                err = body[:200].decode(errors="replace")
            raise PrometheusError(f"Prometheus answered HTTP {status}: {err}")
        try:
            return json.loads(body)
        except ValueError:
            raise PrometheusError("Prometheus answered something that is not JSON") from None

    return fetch


class PrometheusSource:
    """``graph(window)`` / ``series(match, window)`` like ``MetricStore``, from Prometheus' API.

    ``url`` is Prometheus' base URL (``http://127.0.0.1:9090``). ``step`` is the series
    resolution in seconds (at least the scrape interval is sensible); ``rate_window`` the
    range of ``rate()`` in series (at least twice the scrape interval, like Grafana's
    ``$__rate_interval``). Answers are cached for ``cache_ttl`` seconds.
    """

    def __init__(
        self,
        url: str,
        *,
        step: float = 5.0,
        rate_window: float = 60.0,
        timeout: float = 2.0,
        cache_ttl: float = 2.0,
        backoff: float = 5.0,
        clock: Clock = SYSTEM_CLOCK,
        fetch: Fetch | None = None,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"Prometheus URL {url!r} must start with http:// or https://")
        if step <= 0 or rate_window <= 0:
            raise ValueError("step and rate_window must be > 0 seconds")
        self.url = url.rstrip("/")
        self.resolution = step
        self.rate_window = rate_window
        self.cache_ttl = cache_ttl
        self.clock = clock
        self._fetch = fetch or _aiohttp_fetch(timeout)
        self._cache: dict[str, tuple[float, Any]] = {}
        self.failures = 0
        self.queries = 0
        self.last_error = ""
        self.backoff = backoff
        self._down_until = float("-inf")  # after a failure, answer empty until then
        self.skipped = 0

    # ------------------------------------------------------------------ HTTP

    async def query(self, promql: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query; the result vector. Raises :class:`PrometheusError`."""
        params = {"query": promql}
        if at is not None:
            params["time"] = f"{at:.3f}"
        return await self._get("/api/v1/query", params)

    async def query_range(
        self, promql: str, start: float, end: float, step: float
    ) -> list[dict[str, Any]]:
        """A range query; the result matrix. Raises :class:`PrometheusError`."""
        params = {"query": promql, "start": f"{start:.3f}", "end": f"{end:.3f}",
                  "step": f"{step:g}"}  # fmt: skip
        return await self._get("/api/v1/query_range", params)

    async def _get(self, path: str, params: Mapping[str, str]) -> list[dict[str, Any]]:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        now = self.clock.monotonic()
        hit = self._cache.get(url)
        if hit is not None and now - hit[0] < self.cache_ttl:
            return list(hit[1])
        self.queries += 1
        body = await self._fetch(url)
        if not isinstance(body, dict) or body.get("status") != "success":
            err = body.get("error", body) if isinstance(body, dict) else body
            raise PrometheusError(f"Prometheus rejected the query: {err}")
        result = body.get("data", {}).get("result", [])
        if not isinstance(result, list):
            raise PrometheusError("Prometheus answered a result that is not a vector/matrix")
        if len(self._cache) > 256:
            self._cache.clear()
        self._cache[url] = (now, result)
        return list(result)

    def _degraded(self, what: str, exc: Exception) -> None:
        self.failures += 1
        self.last_error = str(exc)
        self._down_until = self.clock.monotonic() + self.backoff
        log.warning(
            "Prometheus %s failed (%d so far; not asking again for %gs): %s",
            what, self.failures, self.backoff, exc,
        )  # fmt: skip

    def _backing_off(self) -> bool:
        """After a failure, skip Prometheus for ``backoff`` seconds (a dashboard poll must not
        wait out a timeout each time)."""
        if self.clock.monotonic() < self._down_until:
            self.skipped += 1
            return True
        return False

    # ------------------------------------------------------------------ MetricStore's API

    async def graph(self, window: float = 60.0, now: float | None = None) -> dict[str, Any]:
        """Nodes and edges with rps, errorRate, codes, p50/p95/p99 (see ``MetricStore.graph``)."""
        at = self._at(now)
        answers: dict[str, list[dict[str, Any]]] = {}
        if not self._backing_off():
            try:
                answers = await self._all(
                    {k: self.query(q, at) for k, q in graph_queries(window).items()}
                )
            except PrometheusError as exc:
                self._degraded("graph query", exc)
                answers = {}
        return fold_graph(window, answers)

    async def series(
        self,
        match: Mapping[str, str] | None = None,
        window: float = 600.0,
        now: float | None = None,
        reporter: str = "destination",
    ) -> list[dict[str, Any]]:
        """Points every ``step`` seconds (see ``MetricStore.series``)."""
        queries = series_queries(
            dict(match or {}), reporter, max(self.rate_window, self.resolution)
        )
        step = self.resolution
        end = math.floor(self._at(now) / step) * step
        n = max(1, math.ceil(window / step))
        start = end - (n - 1) * step
        answers: dict[str, list[dict[str, Any]]] = {}
        if not self._backing_off():
            try:
                answers = await self._all(
                    {k: self.query_range(q, start, end, step) for k, q in queries.items()}
                )
            except PrometheusError as exc:
                self._degraded("series query", exc)
                answers = {}
        return fold_series(start, end, step, answers)

    @staticmethod
    async def _all(
        calls: Mapping[str, Awaitable[list[dict[str, Any]]]],
    ) -> dict[str, list[dict[str, Any]]]:
        """Run the queries concurrently; the first failure fails the whole answer."""
        results = await asyncio.gather(*calls.values(), return_exceptions=True)
        out: dict[str, list[dict[str, Any]]] = {}
        for name, r in zip(calls, results, strict=True):
            if isinstance(r, BaseException):
                raise r
            out[name] = r
        return out

    def _at(self, now: float | None) -> float:
        if now is not None:
            return now
        # the cache key holds the time: round it so polls within cache_ttl share answers
        t = self.clock.time()
        return math.floor(t / self.cache_ttl) * self.cache_ttl if self.cache_ttl > 0 else t
