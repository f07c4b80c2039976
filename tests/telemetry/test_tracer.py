"""The sidecar tracer: Istio attributes, sampling, export of sampled spans only."""

from __future__ import annotations

from diktyo.core.clock import ManualClock, make_random
from diktyo.telemetry.istio_metrics import WorkloadInfo
from diktyo.telemetry.otlp import OtlpExporter
from diktyo.telemetry.tracer import Tracer
from diktyo.telemetry.tracing import inject

ME = WorkloadInfo.from_labels("productpage-v1", "default", {"app": "productpage", "version": "v1"})


async def test_tracer_exports_sampled_spans_with_istio_attributes() -> None:
    exp = OtlpExporter("http://127.0.0.1:9/v1/traces", flush_interval=60)
    clock = ManualClock()
    tracer = Tracer(ME, "productpage-v1-1.default", 100.0, exp, clock, make_random(1))
    assert tracer.service_name == "productpage.default"
    server = tracer.start({"x-request-id": "abc"}, "server", "productpage", 9080, "GET", "/p")
    client = tracer.start(dict(inject(server)), "client", "reviews.default.svc.cluster.local",
                          9080, "GET", "/reviews/0")  # fmt: skip
    assert client.trace_id == server.trace_id and client.parent_id == server.span_id
    clock.advance(0.005)
    tracer.finish(client, 200, "-", "outbound|9080|v2|reviews.default.svc.cluster.local",
                  "127.0.0.1:9081")  # fmt: skip
    tracer.finish(server, 200)
    assert exp.queued == 2
    a = client.attributes
    assert a["node_id"] == "productpage-v1-1.default"
    assert a["istio.canonical_service"] == "productpage" and a["istio.namespace"] == "default"
    assert a["upstream_cluster"].startswith("outbound|9080|v2|")
    assert a["guid:x-request-id"] == "abc" and a["http.status_code"] == 200
    assert client.name == "reviews.default.svc.cluster.local:9080/*"
    await exp.close(close_timeout=1)


async def test_unsampled_spans_are_not_exported_but_propagate_decision() -> None:
    exp = OtlpExporter("http://127.0.0.1:9/v1/traces", flush_interval=60)
    tracer = Tracer(ME, "n", 0.0, exp, ManualClock(), make_random(1))
    span = tracer.start({}, "server", "productpage", 9080, "GET", "/")
    tracer.finish(span, 200)
    assert exp.queued == 0
    assert dict(inject(span))["x-b3-sampled"] == "0"
    await exp.close(close_timeout=1)
