"""Grafana dashboards for a service and a workload, on Istio's metric names (like Istio's own).

The PromQL comes from :mod:`diktyo.telemetry.promql`, the builder the dashboard's Prometheus
source uses too.

``python -m diktyo.telemetry.grafana`` rewrites ``deploy/grafana/diktyo-{service,workload}-
dashboard.json``; a test keeps the committed files equal to this generator and runs every
panel's PromQL against a real Prometheus. The mesh overview lives beside them
(``diktyo-mesh-dashboard.json``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from diktyo.telemetry.promql import (
    DURATION,
    REQUESTS,
    RESPONSE_BYTES,
    TCP_SENT,
    Matcher,
    quantile,
    rate,
    selector,
    success_ratio,
    sum_by,
)

DS = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"


def _var(name: str, label: str, query: str, include_all: bool = False) -> dict[str, Any]:
    return {
        "name": name,
        "type": "query",
        "datasource": DS,
        "label": label,
        "query": {"query": query, "refId": name},
        "definition": query,
        "includeAll": include_all,
        "allValue": ".*" if include_all else None,
        "multi": False,
        "refresh": 2,
        "hide": 0,
    }


def _panel(
    pid: int, title: str, kind: str, exprs: list[tuple[str, str]], x: int, y: int, w: int,
    h: int, unit: str, description: str,
) -> dict[str, Any]:  # fmt: skip
    return {
        "id": pid,
        "title": title,
        "type": kind,
        "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "description": description,
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [
            {"refId": chr(65 + i), "expr": e, "legendFormat": legend, "datasource": DS}
            for i, (e, legend) in enumerate(exprs)
        ],
    }


def _dashboard(title: str, uid: str, description: str, variables: list[dict[str, Any]],
               panels: list[dict[str, Any]]) -> dict[str, Any]:  # fmt: skip
    return {
        "__inputs": [
            {"name": "DS_PROMETHEUS", "label": "Prometheus", "type": "datasource",
             "pluginId": "prometheus", "pluginName": "Prometheus"},
        ],
        "title": title,
        "uid": uid,
        "description": description,
        "tags": ["diktyo", "istio"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "10s",
        "time": {"from": "now-15m", "to": "now"},
        "templating": {
            "list": [
                {"name": "datasource", "type": "datasource", "query": "prometheus",
                 "label": "Data source", "current": {}, "hide": 0},
                *variables,
            ]
        },
        "panels": panels,
    }


def _golden(sel: list[Matcher], by: str, y: int, first_id: int, who: str) -> list[dict[str, Any]]:
    """Request rate, success rate, p50/p90/p99 and bytes for ``istio_*{sel}`` grouped ``by``."""
    flagged = selector([*sel, ("response_flags", "!=", "-")])
    return [
        _panel(first_id, f"Request rate by {who}", "timeseries",
               [(f"round({sum_by(rate(REQUESTS, selector(sel), RATE), (by, 'response_code'))}, 0.001)",
                 f"{{{{{by}}}}} {{{{response_code}}}}")],
               0, y, 12, 8, "reqps", "Requests per second by response code."),
        _panel(first_id + 1, f"Success rate by {who}", "timeseries",
               [(success_ratio(sel, RATE, (by,)), f"{{{{{by}}}}}")],
               12, y, 12, 8, "percentunit", "Share of requests answered without a 5xx."),
        _panel(first_id + 2, f"Request duration by {who}", "timeseries",
               [(quantile(q, DURATION, selector(sel), RATE, (by,)), f"{{{{{by}}}}} p{int(q * 100)}")
                for q in (0.5, 0.9, 0.99)],
               0, y + 8, 12, 8, "ms", "Latency percentiles from Istio's duration histogram."),
        _panel(first_id + 3, f"Response size by {who}", "timeseries",
               [(quantile(0.5, RESPONSE_BYTES, selector(sel), RATE, (by,)), f"{{{{{by}}}}} p50"),
                (quantile(0.99, RESPONSE_BYTES, selector(sel), RATE, (by,)), f"{{{{{by}}}}} p99")],
               12, y + 8, 12, 8, "bytes", "Response body sizes."),
        _panel(first_id + 4, f"Response flags by {who}", "timeseries",
               [(sum_by(rate(REQUESTS, flagged, RATE), (by, "response_flags")),
                 f"{{{{{by}}}}} {{{{response_flags}}}}")],
               0, y + 16, 24, 7, "reqps",
               "Envoy response flags (UO circuit breaker, UH no healthy upstream, UT timeout, ...)."),
    ]  # fmt: skip


def _volume(sel: list[Matcher]) -> str:
    return f"round({sum_by(rate(REQUESTS, selector(sel), RATE))}, 0.01)"


def service_dashboard() -> dict[str, Any]:
    sel_in: list[Matcher] = [("reporter", "=", "destination"), ("destination_service", "=~", "$service")]
    sel_out: list[Matcher] = [("reporter", "=", "source"), ("destination_service", "=~", "$service")]
    panels = [
        _panel(1, "Client request volume", "stat", [(_volume(sel_out), "")],
               0, 0, 8, 4, "reqps", "Requests per second to this service, as clients report."),
        _panel(2, "Client success rate (non-5xx)", "stat", [(success_ratio(sel_out, RATE), "")],
               8, 0, 8, 4, "percentunit", "Share of client requests without a 5xx."),
        _panel(3, "Client request duration p99", "stat",
               [(quantile(0.99, DURATION, selector(sel_out), RATE), "")],
               16, 0, 8, 4, "ms", "p99 latency clients see."),
        *_golden(sel_out, "source_workload", 4, 10, "client workload"),
        *_golden(sel_in, "destination_workload", 27, 20, "service workload"),
    ]  # fmt: skip
    return _dashboard(
        "diktyo service", "diktyo-service",
        "One service: what its clients see and what its workloads serve (Istio metric names).",
        [_var("service", "Service",
              f"label_values({REQUESTS}, destination_service)")],
        panels,
    )  # fmt: skip


def workload_dashboard() -> dict[str, Any]:
    sel_in: list[Matcher] = [
        ("reporter", "=", "destination"), ("destination_workload", "=~", "$workload"),
        ("destination_workload_namespace", "=~", "$namespace"),
    ]  # fmt: skip
    sel_out: list[Matcher] = [
        ("reporter", "=", "source"), ("source_workload", "=~", "$workload"),
        ("source_workload_namespace", "=~", "$namespace"),
    ]  # fmt: skip
    ns = selector([("destination_workload_namespace", "=~", "$namespace")])
    panels = [
        _panel(1, "Incoming request volume", "stat", [(_volume(sel_in), "")],
               0, 0, 8, 4, "reqps", "Requests per second this workload serves."),
        _panel(2, "Incoming success rate (non-5xx)", "stat", [(success_ratio(sel_in, RATE), "")],
               8, 0, 8, 4, "percentunit", "Share of served requests without a 5xx."),
        _panel(3, "TCP bytes sent", "stat",
               [(sum_by(rate(TCP_SENT, selector(sel_in), RATE)), "")],
               16, 0, 8, 4, "Bps", "TCP bytes per second this workload sends back."),
        *_golden(sel_in, "source_workload", 4, 10, "caller (inbound)"),
        *_golden(sel_out, "destination_service", 27, 20, "destination (outbound)"),
    ]  # fmt: skip
    return _dashboard(
        "diktyo workload", "diktyo-workload",
        "One workload: inbound traffic by caller and outbound traffic by destination.",
        [_var("namespace", "Namespace",
              f"label_values({REQUESTS}, destination_workload_namespace)", True),
         _var("workload", "Workload",
              f"label_values({REQUESTS}{ns}, destination_workload)")],
        panels,
    )  # fmt: skip


DASHBOARDS = {
    "diktyo-service-dashboard.json": service_dashboard,
    "diktyo-workload-dashboard.json": workload_dashboard,
}


def render(build: Any) -> str:
    return json.dumps(build(), indent=1) + "\n"


def main(argv: list[str] | None = None) -> int:
    out = Path(argv[0] if argv else "deploy/grafana")
    for name, build in DASHBOARDS.items():
        (out / name).write_text(render(build))
        print(f"wrote {out / name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
