"""The dashboard's data: the embedded metric and trace stores, config and sidecar state, shaped for the UI.

``MeshBackend`` adapts ``diktyo.telemetry.store`` (edges keyed by Istio's labels) into the
graph the UI draws (Kiali's versioned-app and workload views) and series it charts. Config
and resilience come from callables the control plane passes in, so this module knows nothing
of the server.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from diktyo.telemetry.store import TraceStore

ConfigFn = Callable[[], dict[str, Any]]
ResilienceFn = Callable[[], "list[dict[str, Any]] | Awaitable[list[dict[str, Any]]]"]
MtlsFn = Callable[[str, str], bool]


class MetricSource(Protocol):
    """What the dashboard reads metrics from: the embedded ``MetricStore`` (answers at once)
    or a ``diktyo.telemetry.prometheus_source.PrometheusSource`` (same shapes, awaitable:
    it asks Prometheus without blocking the event loop)."""

    def graph(self, window: float = ...) -> Any: ...
    def series(
        self,
        match: Mapping[str, str] | None = ...,
        window: float = ...,
        now: float | None = ...,
        reporter: str = ...,
    ) -> Any: ...


async def _value(result: Any) -> Any:
    return await result if inspect.isawaitable(result) else result


def short_service(fqdn: str) -> str:
    """``reviews.default.svc.cluster.local`` -> ``reviews``; external hosts stay whole."""
    if fqdn.endswith(".svc.cluster.local"):
        return fqdn.split(".", 1)[0]
    return fqdn


def app_of(workload: str, version: str) -> str:
    """Istio's canonical service guess: the workload name without its ``-<version>`` suffix."""
    if version and version != "unknown" and workload.endswith("-" + version):
        return workload[: -len(version) - 1]
    return workload


class MeshBackend:
    def __init__(
        self,
        metrics: MetricSource,
        traces: TraceStore,
        config: ConfigFn | None = None,
        resilience: ResilienceFn | None = None,
        mtls: MtlsFn | None = None,
    ) -> None:
        self.metrics = metrics
        self.traces_store = traces
        self._config = config
        self._resilience = resilience
        self._mtls = mtls

    # ------------------------------------------------------------------ graph

    async def graph(self, window: float) -> dict[str, Any]:
        g = await _value(self.metrics.graph(window))
        nodes: dict[str, dict[str, Any]] = {}
        edges: list[dict[str, Any]] = []
        # A server sidecar that cannot tell who called it reports source "unknown". When the
        # caller's sidecar reported the same calls itself, that "unknown" edge is a duplicate
        # view of them, not a second client: drop it (Kiali does the same).
        seen_by_source = {
            (e["destinationService"], e["destinationWorkload"])
            for e in g["edges"]
            if e.get("reporter") == "source" and e["sourceWorkload"] != "unknown"
        }
        for e in g["edges"]:
            src_wl, src_ver = e["sourceWorkload"], e["sourceVersion"]
            if (
                src_wl == "unknown"
                and e.get("reporter") == "destination"
                and (e["destinationService"], e["destinationWorkload"]) in seen_by_source
            ):
                continue
            if src_wl == "unknown":
                src = "unknown"
                nodes.setdefault(src, {"id": src, "kind": "unknown", "app": "unknown"})
            else:
                ns = e["source"].split("/", 1)[0] if "/" in e["source"] else "default"
                src = f"{ns}/{src_wl}"
                nodes.setdefault(src, {"id": src, "kind": "workload", "workload": src_wl,
                                       "app": app_of(src_wl, src_ver), "version": src_ver,
                                       "namespace": ns})  # fmt: skip
            svc = e["destinationService"]
            dst_wl, dst_ver = e["destinationWorkload"], e["destinationVersion"]
            if dst_wl == "unknown":
                dst = svc
                external = not svc.endswith(".svc.cluster.local")
                nodes.setdefault(dst, {"id": dst, "kind": "external" if external else "service",
                                       "app": short_service(svc), "service": svc})  # fmt: skip
            else:
                parts = svc.split(".")
                ns = (
                    parts[1] if svc.endswith(".svc.cluster.local") and len(parts) > 2 else "default"
                )
                dst = f"{ns}/{dst_wl}"
                nodes.setdefault(dst, {"id": dst, "kind": "workload", "workload": dst_wl,
                                       "app": short_service(svc), "version": dst_ver,
                                       "namespace": ns, "service": svc})  # fmt: skip
            rps, err = e["rps"], e["errorRate"]
            node = nodes[dst]
            node["rps_in"] = node.get("rps_in", 0.0) + rps
            node["_err_rq"] = node.get("_err_rq", 0.0) + err * e["requests"]
            node["_rq"] = node.get("_rq", 0) + e["requests"]
            if e["p99"] is not None:
                node["p99_ms"] = max(node.get("p99_ms") or 0.0, e["p99"])
            edges.append(
                {
                    "source": src,
                    "target": dst,
                    "service": svc,
                    "rps": rps,
                    "requests": e["requests"],
                    "error_rate": err,
                    "p50_ms": e["p50"],
                    "p99_ms": e["p99"],
                    "codes": {k: v / g["window"] for k, v in e["codes"].items()},
                    "mtls": bool(self._mtls and self._mtls(src, dst)),
                }
            )
        for n in nodes.values():
            rq = n.pop("_rq", 0)
            err_rq = n.pop("_err_rq", 0.0)
            n["error_rate_in"] = (err_rq / rq) if rq else 0.0
            n["unhealthy"] = n["error_rate_in"] > 0.1
        return {"window": g["window"], "nodes": list(nodes.values()), "edges": edges}

    async def services(self) -> list[dict[str, Any]]:
        g = await _value(self.metrics.graph(3600.0))
        seen = sorted({e["destinationService"] for e in g["edges"]})
        return [{"name": s, "short": short_service(s)} for s in seen]

    async def series(
        self, service: str, window: float, source: str | None = None
    ) -> dict[str, Any]:
        """Points for a service, or for one edge when ``source`` (a caller workload) is given;
        an edge is what the caller's sidecar saw (reporter "source"), as Kiali shows it."""
        if source:
            points = await _value(self.metrics.series(
                {"destination_service": service, "source_workload": source}, window,
                reporter="source",
            ))  # fmt: skip
        else:
            points = await _value(self.metrics.series({"destination_service": service}, window))
        return {
            "t": [p["t"] for p in points],
            "rps": [p["rps"] for p in points],
            "success_rate": [(1.0 - p["errorRate"]) if p["requests"] else None for p in points],
            "p50": [p["p50"] for p in points],
            "p95": [p["p95"] for p in points],
            "p99": [p["p99"] for p in points],
        }

    # ------------------------------------------------------------------ traces

    def traces(
        self, service: str | None, min_ms: float, errors: bool, limit: int
    ) -> list[dict[str, Any]]:
        rows = self.traces_store.list_traces(
            service=service, min_duration_ms=min_ms or None, errors_only=errors, limit=limit
        )
        return [
            {
                "trace_id": r["traceId"],
                "start_ms": r["startNs"] / 1e6,
                "duration_ms": r["durationMs"],
                "spans": r["spanCount"],
                "error": r["errors"] > 0,
                "services": r["services"],
                "root_service": r["rootService"] or "?",
                "root_name": r["rootName"] or "?",
            }
            for r in rows
        ]

    def trace(self, trace_id: str) -> dict[str, Any] | None:
        spans = self.traces_store.get_trace(trace_id)
        if not spans:
            return None
        return {
            "trace_id": trace_id.lower(),
            "spans": [
                {
                    "span_id": s["spanId"],
                    "parent_id": s["parentId"],
                    "service": s["service"],
                    "name": s["name"],
                    "start_ms": s["startNs"] / 1e6,
                    "duration_ms": s["durationMs"],
                    "error": s["status"] == "error",
                    "attributes": s["attributes"],
                }
                for s in spans
            ],
        }

    # ------------------------------------------------------------------ config / resilience

    def config(self) -> dict[str, Any]:
        return self._config() if self._config else {"resources": [], "messages": []}

    async def resilience(self) -> list[dict[str, Any]]:
        if self._resilience is None:
            return []
        result = self._resilience()
        if inspect.isawaitable(result):
            result = await result
        return list(result)
