"""One PromQL builder and one service-graph fold, shared by the Prometheus source, the Grafana
dashboards and the embedded store."""

from __future__ import annotations

import json

import pytest

from diktyo.telemetry import grafana, promql
from diktyo.telemetry.prometheus_source import fold_graph, graph_queries
from diktyo.telemetry.store import EDGE_LABELS, MetricStore, golden_signals, service_graph

REVIEWS = "reviews.default.svc.cluster.local"


def test_selector_escapes_values_and_keeps_matcher_order() -> None:
    assert promql.selector({}) == ""
    assert promql.selector({"b": 'x"y', "a": "1\\2\n"}) == '{a="1\\\\2\\n",b="x\\"y"}'
    sel = promql.selector([("reporter", "=", "source"), ("destination_service", "=~", "$service")])
    assert sel == '{reporter="source",destination_service=~"$service"}'
    with pytest.raises(ValueError, match="operator '=='"):
        promql.selector([("a", "==", "b")])


def test_builders_write_one_form() -> None:
    assert promql.sum_by("x") == "sum(x)"
    assert promql.sum_by("x", ("a", "b")) == "sum by (a, b) (x)"
    assert promql.quantile(0.99, promql.DURATION, "", "1m", ("source_workload",)) == (
        "histogram_quantile(0.99, sum by (source_workload, le) "
        "(rate(istio_request_duration_milliseconds_bucket[1m])))"
    )
    ratio = promql.success_ratio([("reporter", "=", "destination")], "1m")
    assert ratio == (
        'sum(rate(istio_requests_total{reporter="destination",response_code!~"5.."}[1m])) / '
        'sum(rate(istio_requests_total{reporter="destination"}[1m]))'
    )


def test_grafana_and_prometheus_source_use_the_same_builder() -> None:
    """Every quantile both emit has the builder's one shape (no second hand-written form)."""
    exprs = [t["expr"] for d in grafana.DASHBOARDS.values()
             for p in d()["panels"] for t in p["targets"]]  # fmt: skip
    exprs += list(graph_queries(60).values())
    quantiles = [e for e in exprs if "histogram_quantile" in e]
    assert len(quantiles) > 10
    assert all("sum by (" in e and ") by (" not in e for e in quantiles), quantiles
    assert json.dumps(grafana.service_dashboard()).count("sum(rate(") > 0  # ungrouped sums too


def _sig(requests: float) -> dict[str, object]:
    return golden_signals(60, requests, 0, {"2xx": requests}, (1.0, 2.0, 3.0), 0, 0, 0)


def test_service_graph_prefers_the_source_reporter_and_names_nodes() -> None:
    src = ("source", "productpage-v1", "default", "v1", REVIEWS, "reviews-v1", "v1")
    dst = ("destination", *src[1:])
    anon = ("destination", "unknown", "unknown", "unknown", REVIEWS, "reviews-v2", "v2")
    g = service_graph(60, {dst: _sig(7), src: _sig(5), anon: _sig(2)})
    assert [(e["source"], e["reporter"], e["requests"]) for e in g["edges"]] == [
        ("default/productpage-v1", "source", 5),
        ("unknown", "destination", 2),
    ]
    assert {n["id"] for n in g["nodes"]} == {"default/productpage-v1", "unknown", REVIEWS}
    assert g["edges"][1]["p50"] == 1.0 and g["window"] == 60


def test_both_sources_fold_to_the_same_graph() -> None:
    """The embedded store and the Prometheus source give equal graphs for the same traffic."""
    labels = dict(zip(EDGE_LABELS, ("source", "productpage-v1", "default", "v1", REVIEWS,
                                    "reviews-v1", "v1"), strict=True))  # fmt: skip
    lbl = ",".join(f'{k}="{v}"' for k, v in labels.items())
    store = MetricStore(resolution=5.0)

    def text(ok: int, bad: int) -> str:
        return (
            f'istio_requests_total{{{lbl},response_code="200"}} {ok}\n'
            f'istio_requests_total{{{lbl},response_code="503"}} {bad}\n'
            f"istio_request_duration_milliseconds_sum{{{lbl}}} {10.0 * (ok + bad)}\n"
        )

    store.ingest("pp", text(0, 0), t=1000.0)
    store.ingest("pp", text(30, 10), t=1005.0)
    ref = store.graph(60.0, now=1005.0)

    def row(v: float, **extra: str) -> dict[str, object]:
        return {"metric": {**labels, **extra}, "value": [1005, str(v)]}

    answers = {
        "requests": [row(30, response_code="200"), row(10, response_code="503")],
        "duration_sum": [row(400.0)],
    }
    got = fold_graph(60.0, answers)
    assert got == ref
