"""The Telemetry API through real sidecar processes: mesh-wide access logs and metric overrides
(istio-system), 100 % sampling with a custom tag for one namespace, access logs and span
reporting off for one workload, a CEL filter for another namespace."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
import pytest

from diktyo.api import load_text
from diktyo.control.model import (
    ProxyNode,
    PushContext,
    Registry,
    Service,
    ServicePort,
    WorkloadInstance,
)
from diktyo.control.translate import translate
from diktyo.snapshot.model import AccessLog, Listener, MeshConfig, Node, Snapshot, Tracing
from diktyo.telemetry.otlp import decode_spans
from diktyo.testing import FakeUpstream, Response, eventually, http_request
from diktyo.testing.sidecar import start_sidecar_process

pytestmark = pytest.mark.timeout(120)

TELEMETRY = """
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec:
  accessLogging:
  - providers: [{name: envoy}]
  tracing:
  - randomSamplingPercentage: 0
  metrics:
  - overrides:
    - match: {metric: REQUEST_DURATION, mode: CLIENT}
      disabled: true
    - match: {metric: REQUEST_COUNT}
      tagOverrides:
        request_protocol: {operation: REMOVE}
        mesh: {value: "'diktyo'"}
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: shop, namespace: shop}
spec:
  tracing:
  - randomSamplingPercentage: 100
    customTags:
      team: {literal: {value: shop}}
      user: {header: {name: x-user, defaultValue: anonymous}}
---
apiVersion: telemetry.istio.io/v1alpha1
kind: Telemetry
metadata: {name: quiet-cart, namespace: shop}
spec:
  selector: {matchLabels: {app: cart}}
  accessLogging:
  - disabled: true
  tracing:
  - disableSpanReporting: true
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: errors-only, namespace: front}
spec:
  accessLogging:
  - filter: {expression: "response.code >= 400"}
"""

BACKEND = "backend.default.svc.cluster.local"


def snapshot(
    workload: str, ns: str, app: str, upstream: int, collector: int, log: Path
) -> Snapshot:
    result = load_text(TELEMETRY, "telemetry.yaml")
    assert result.ok, [str(e) for e in result.errors]
    registry = Registry(
        services=(Service(hostname=BACKEND, ports=(ServicePort(number=80),), short_name="backend"),),
        instances=(
            WorkloadInstance(
                name="backend-1", workload="backend", address="127.0.0.1",
                ports={80: upstream}, services=(BACKEND,),
            ),
        ),
    )  # fmt: skip
    mesh = MeshConfig(
        tracing=Tracing(sampling=1.0, otlp_endpoint=f"http://127.0.0.1:{collector}/v1/traces"),
        access_log=AccessLog(enabled=False, path=str(log)),
    )
    push = PushContext(tuple(result.resources), registry, mesh, "1")
    node = Node(id=f"{workload}-1.{ns}", workload=workload, namespace=ns, labels={"app": app})
    snap = translate(ProxyNode(node=node), push)
    # an outbound listener on a port the sidecar picks (the app would use it as HTTP_PROXY)
    listener = Listener(name="outbound", direction="outbound", port=0, route_table="outbound")
    return msgspec.structs.replace(snap, listeners=(listener, *snap.listeners))


async def _until(cond, timeout: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    await eventually(cond, timeout=timeout)


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


async def test_telemetry_api_scopes_through_sidecars(tmp_path: Path) -> None:
    async with (
        FakeUpstream(
            handler=lambda req: Response(status=500 if "fail" in req.path else 200)
        ) as backend,
        FakeUpstream(Response(body=b"")) as collector,
    ):
        logs = {name: tmp_path / f"{name}.log" for name in ("web", "cart", "front")}
        snaps = {
            "web": snapshot("web", "shop", "web", backend.port, collector.port, logs["web"]),
            "cart": snapshot("cart", "shop", "cart", backend.port, collector.port, logs["cart"]),
            "front": snapshot("front", "front", "front", backend.port, collector.port, logs["front"]),
        }  # fmt: skip
        assert snaps["web"].telemetry is not None
        assert snaps["web"].telemetry.sources == ("istio-system/mesh-default", "shop/shop")
        async with (
            start_sidecar_process(snaps["web"]) as web,
            start_sidecar_process(snaps["cart"]) as cart,
            start_sidecar_process(snaps["front"]) as front,
        ):
            url = "http://backend.default"
            for sc in (web, cart, front):
                for path in ("/ok", "/fail"):
                    await http_request(sc.port(), "GET", url + path, {"x-user": "ana"})
            await http_request(web.port(), "GET", url + "/anonymous")
            sampled = [r.headers["traceparent"].endswith("-01") for r in backend.requests]
            # shop (web, cart): 100 %; the mesh default elsewhere (front): 0 %
            assert sampled == [True, True, True, True, False, False, True]

            # access logs: mesh-wide on; off for the cart workload; errors only in front
            await _until(lambda: len(_lines(logs["web"])) == 3 and len(_lines(logs["front"])) == 1)
            assert " /fail " in _lines(logs["front"])[0] and '" 500 ' in _lines(logs["front"])[0]
            assert _lines(logs["cart"]) == []

            # spans: web reports with the namespace's custom tags, cart reports none
            def spans():  # type: ignore[no-untyped-def]
                return [s for q in collector.requests for s in decode_spans(q.body)]

            await _until(lambda: len(spans()) >= 3)
            await asyncio.sleep(0.5)  # real time: a span from cart would have arrived by now
            got = spans()
            assert {s.attributes.get("node_id") for s in got} == {"web-1.shop"}
            assert len(got) == 3
            assert all(s.attributes["team"] == "shop" for s in got)
            assert sorted(s.attributes["user"] for s in got) == ["ana", "ana", "anonymous"]

            # metrics: duration off for the client reporter, request_protocol removed, tag added
            r = await http_request(
                web.admin, "GET", f"http://127.0.0.1:{web.admin}/stats/prometheus"
            )
            text = r.body.decode()
            assert "istio_request_duration_milliseconds" not in text
            counts = [ln for ln in text.splitlines() if ln.startswith("istio_requests_total{")]
            assert len(counts) == 2  # 200 and 500
            assert all('mesh="diktyo"' in ln and "request_protocol" not in ln for ln in counts)
            assert "istio_request_bytes_bucket" in text  # other families untouched
