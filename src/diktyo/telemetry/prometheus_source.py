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

The PromQL text and the folding of answers into the store's shapes are pure functions
(:func:`graph_queries`, :func:`fold_graph`, :func:`series_queries`, :func:`fold_series`); the
class adds blocking HTTP (``urllib``, short timeout, localhost Prometheus answers in
milliseconds) and a short cache so a dashboard polling every few seconds asks once. When
Prometheus cannot be reached or answers an error, the source logs a warning, counts it in
``failures`` and answers an empty graph / empty points (the dashboard shows "no traffic"
rather than failing); for ``backoff`` seconds after a failure it does not ask again (the
calls block the control plane's loop, so a hung Prometheus must not be waited on per poll).
"""

from __future__ import annotations

import json
import logging
import math
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any

from diktyo.core.clock import SYSTEM_CLOCK, Clock
from diktyo.telemetry.store import EDGE_LABELS

log = logging.getLogger(__name__)

QUANTILES = (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))
_BY = ", ".join(EDGE_LABELS)

Fetch = Callable[[str], Any]  # URL -> parsed JSON body of a Prometheus API answer


class PrometheusError(RuntimeError):
    """Prometheus could not be reached or rejected a query."""


def promql_string(value: str) -> str:
    """A PromQL double-quoted string literal for ``value``."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def selector(match: Mapping[str, str]) -> str:
    """``{k="v",...}`` for label equality matchers (``""`` for none)."""
    if not match:
        return ""
    return "{" + ",".join(f"{k}={promql_string(v)}" for k, v in sorted(match.items())) + "}"


def _duration(seconds: float) -> str:
    return f"{max(1, math.ceil(seconds))}s"


def _num(raw: Any) -> float | None:
    try:
        v = float(raw)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _code_class(code: str) -> str:
    return f"{code[0]}xx" if len(code) == 3 and code.isdigit() else code or "0"


def _is_error(code: str) -> bool:
    return code in ("0", "") or code.startswith("5")


# --------------------------------------------------------------------------- graph (pure)


def graph_queries(window: float) -> dict[str, str]:
    """The instant PromQL queries behind ``graph(window)``, by name."""
    w = _duration(window)
    q = {
        "requests": f"sum by ({_BY}, response_code) (increase(istio_requests_total[{w}]))",
        "duration_sum": f"sum by ({_BY}) (increase(istio_request_duration_milliseconds_sum[{w}]))",
        "tcp_sent": f"sum by ({_BY}) (rate(istio_tcp_sent_bytes_total[{w}]))",
        "tcp_received": f"sum by ({_BY}) (rate(istio_tcp_received_bytes_total[{w}]))",
    }
    for name, quant in QUANTILES:
        q[name] = (
            f"histogram_quantile({quant}, sum by ({_BY}, le) "
            f"(rate(istio_request_duration_milliseconds_bucket[{w}])))"
        )
    return q


def _edge(metric: Mapping[str, str]) -> tuple[str, ...]:
    return tuple(metric.get(n, "unknown") or "unknown" for n in EDGE_LABELS)


def _empty_stats() -> dict[str, Any]:
    return {"requests": 0.0, "errors": 0.0, "codes": {}, "p50": None, "p95": None, "p99": None,
            "duration_sum": 0.0, "tcp_sent": 0.0, "tcp_received": 0.0}  # fmt: skip


def _summary(s: Mapping[str, Any], seconds: float) -> dict[str, Any]:
    rq = s["requests"]
    return {
        "requests": rq,
        "rps": rq / seconds if seconds > 0 else 0.0,
        "errorRate": (s["errors"] / rq) if rq else 0.0,
        "codes": dict(sorted(s["codes"].items())),
        "p50": s["p50"] if rq else None,
        "p95": s["p95"] if rq else None,
        "p99": s["p99"] if rq else None,
        "meanMs": (s["duration_sum"] / rq) if rq else None,
        "tcpSentBps": s["tcp_sent"],
        "tcpReceivedBps": s["tcp_received"],
    }


def fold_graph(window: float, answers: Mapping[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """``MetricStore.graph`` shape from the instant-vector answers of :func:`graph_queries`."""
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
        cls = _code_class(code)
        s["codes"][cls] = s["codes"].get(cls, 0.0) + v
        if _is_error(code):
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
    # one edge per (source, destination): reporter="source" when present, like MetricStore
    merged: dict[tuple[str, ...], tuple[str, dict[str, Any]]] = {}
    for key, s in sorted(per_edge.items(), key=lambda kv: kv[0][0] != "source"):
        rest = key[1:]
        if rest not in merged:
            merged[rest] = (key[0], s)
    nodes: dict[str, dict[str, Any]] = {}
    edges_out = []
    for (src_wl, src_ns, src_ver, dst_svc, dst_wl, dst_ver), (reporter, s) in sorted(
        merged.items()
    ):
        src_id = f"{src_ns}/{src_wl}" if src_wl != "unknown" else "unknown"
        nodes.setdefault(src_id, {"id": src_id, "kind": "workload", "name": src_wl,
                                  "namespace": src_ns})  # fmt: skip
        nodes.setdefault(dst_svc, {"id": dst_svc, "kind": "service", "name": dst_svc})
        edges_out.append(
            {
                "source": src_id,
                "target": dst_svc,
                "sourceWorkload": src_wl,
                "sourceVersion": src_ver,
                "destinationService": dst_svc,
                "destinationWorkload": dst_wl,
                "destinationVersion": dst_ver,
                "reporter": reporter,
                **_summary(s, span),
            }
        )
    return {"window": span, "nodes": list(nodes.values()), "edges": edges_out}


# --------------------------------------------------------------------------- series (pure)


def series_queries(match: Mapping[str, str], reporter: str, rate_window: float) -> dict[str, str]:
    """The range PromQL queries behind ``series(match, window)``, by name."""
    unknown = [k for k in match if k not in EDGE_LABELS or k == "reporter"]
    if unknown:
        raise ValueError(f"unknown filter {unknown[0]!r}; use one of {', '.join(EDGE_LABELS[1:])}")
    sel = selector({**match, "reporter": reporter})
    r = _duration(rate_window)
    q = {
        "codes": f"sum by (response_code) (rate(istio_requests_total{sel}[{r}]))",
        "duration_sum": f"sum(rate(istio_request_duration_milliseconds_sum{sel}[{r}]))",
        "tcp_sent": f"sum(rate(istio_tcp_sent_bytes_total{sel}[{r}]))",
        "tcp_received": f"sum(rate(istio_tcp_received_bytes_total{sel}[{r}]))",
    }
    for name, quant in QUANTILES:
        q[name] = (
            f"histogram_quantile({quant}, sum by (le) "
            f"(rate(istio_request_duration_milliseconds_bucket{sel}[{r}])))"
        )
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
                    cls = _code_class(code)
                    s["codes"][cls] = s["codes"].get(cls, 0.0) + rq
                    if _is_error(code):
                        s["errors"] += rq
                elif name == "duration_sum":
                    s[name] += v * step
                else:
                    s[name] = v
    return [{"t": t, **_summary(s, step)} for t, s in zip(times, acc, strict=True)]


# --------------------------------------------------------------------------- the source


def _urllib_fetch(timeout: float) -> Fetch:
    def fetch(url: str) -> Any:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                body = resp.read()
        except urllib.error.HTTPError as exc:
            body = exc.read()
            try:
                err = json.loads(body).get("error", "")
            except ValueError:
                err = body[:200].decode(errors="replace")
            raise PrometheusError(f"Prometheus answered HTTP {exc.code}: {err}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise PrometheusError(f"cannot reach Prometheus at {url.split('/api/')[0]}: {reason}")
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
        self._fetch = fetch or _urllib_fetch(timeout)
        self._cache: dict[str, tuple[float, Any]] = {}
        self.failures = 0
        self.queries = 0
        self.last_error = ""
        self.backoff = backoff
        self._down_until = float("-inf")  # after a failure, answer empty until then
        self.skipped = 0

    # ------------------------------------------------------------------ HTTP

    def query(self, promql: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query; the result vector. Raises :class:`PrometheusError`."""
        params = {"query": promql}
        if at is not None:
            params["time"] = f"{at:.3f}"
        return self._get("/api/v1/query", params)

    def query_range(
        self, promql: str, start: float, end: float, step: float
    ) -> list[dict[str, Any]]:
        """A range query; the result matrix. Raises :class:`PrometheusError`."""
        params = {"query": promql, "start": f"{start:.3f}", "end": f"{end:.3f}",
                  "step": f"{step:g}"}  # fmt: skip
        return self._get("/api/v1/query_range", params)

    def _get(self, path: str, params: Mapping[str, str]) -> list[dict[str, Any]]:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        now = self.clock.monotonic()
        hit = self._cache.get(url)
        if hit is not None and now - hit[0] < self.cache_ttl:
            return list(hit[1])
        self.queries += 1
        body = self._fetch(url)
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
        """After a failure, skip Prometheus for ``backoff`` seconds (the caller blocks on it)."""
        if self.clock.monotonic() < self._down_until:
            self.skipped += 1
            return True
        return False

    # ------------------------------------------------------------------ MetricStore's API

    def graph(self, window: float = 60.0, now: float | None = None) -> dict[str, Any]:
        """Nodes and edges with rps, errorRate, codes, p50/p95/p99 (see ``MetricStore.graph``)."""
        at = self._at(now)
        answers: dict[str, list[dict[str, Any]]] = {}
        if not self._backing_off():
            try:
                answers = {k: self.query(q, at) for k, q in graph_queries(window).items()}
            except PrometheusError as exc:
                self._degraded("graph query", exc)
                answers = {}
        return fold_graph(window, answers)

    def series(
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
                answers = {k: self.query_range(q, start, end, step) for k, q in queries.items()}
            except PrometheusError as exc:
                self._degraded("series query", exc)
                answers = {}
        return fold_series(start, end, step, answers)

    def _at(self, now: float | None) -> float:
        if now is not None:
            return now
        # the cache key holds the time: round it so polls within cache_ttl share answers
        t = self.clock.time()
        return math.floor(t / self.cache_ttl) * self.cache_ttl if self.cache_ttl > 0 else t
