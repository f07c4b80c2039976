"""Property: any config that loads translates to a snapshot the wire format accepts."""

from __future__ import annotations

import io
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ruamel.yaml import YAML

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
from diktyo.control.validate import analyze
from diktyo.snapshot import from_builtins, to_builtins
from diktyo.snapshot.model import Node

HOSTS = [
    "reviews",
    "ratings",
    "reviews.default.svc.cluster.local",
    "api.example.com",
    "*.example.com",
]
SUBSETS = ["v1", "v2", "v3"]

dest = st.fixed_dictionaries(
    {"host": st.sampled_from(HOSTS)},
    optional={
        "subset": st.sampled_from(SUBSETS),
        "port": st.fixed_dictionaries({"number": st.sampled_from([80, 9080, 9090])}),
    },
)
match = st.fixed_dictionaries(
    {},
    optional={
        "uri": st.sampled_from([{"prefix": "/"}, {"exact": "/a"}, {"regex": "/b.*"}]),
        "headers": st.just({"end-user": {"exact": "jason"}}),
        "sourceLabels": st.sampled_from([{"app": "productpage"}, {"app": "other"}]),
        "port": st.sampled_from([9080, 9090]),
        "gateways": st.sampled_from([["mesh"], ["gw"]]),
    },
)
rule = st.fixed_dictionaries(
    {},
    optional={
        "match": st.lists(match, max_size=2),
        "route": st.lists(
            st.fixed_dictionaries({"destination": dest}, optional={"weight": st.integers(0, 100)}),
            max_size=3,
        ),
        "timeout": st.sampled_from(["1s", "0s", "250ms"]),
        "retries": st.fixed_dictionaries(
            {}, optional={"attempts": st.integers(0, 5), "retryOn": st.just("5xx,503")}
        ),
        "fault": st.just({"abort": {"httpStatus": 503, "percent": 10}}),
        "mirror": dest,
        "redirect": st.just({"uri": "/x"}),
        "directResponse": st.just({"status": 418}),
    },
)
vs = st.fixed_dictionaries(
    {
        "hosts": st.lists(st.sampled_from(HOSTS), min_size=1, max_size=2),
        "http": st.lists(rule, max_size=3),
    },
    optional={"gateways": st.sampled_from([["mesh"], ["gw"], ["mesh", "gw"]])},
)
subset = st.fixed_dictionaries(
    {
        "name": st.sampled_from(SUBSETS),
        "labels": st.sampled_from([{"version": "v1"}, {"version": "v2"}]),
    },
    optional={"trafficPolicy": st.just({"loadBalancer": {"simple": "RANDOM"}})},
)
dr = st.fixed_dictionaries(
    {"host": st.sampled_from(HOSTS), "subsets": st.lists(subset, max_size=3)},
    optional={
        "trafficPolicy": st.just(
            {
                "portLevelSettings": [
                    {"port": {"number": 9090}, "connectionPool": {"tcp": {"maxConnections": 1}}}
                ]
            }
        )
    },
)


def _doc(kind: str, name: str, spec: Any) -> str:
    buf = io.StringIO()
    YAML(typ="safe", pure=True).dump(
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": kind,
            "metadata": {"name": name},
            "spec": spec,
        },
        buf,
    )
    return buf.getvalue()


REGISTRY = Registry(
    services=(
        Service(
            hostname="reviews.default.svc.cluster.local",
            ports=(ServicePort(9080), ServicePort(9090, name="http-admin")),
            short_name="reviews",
        ),
        Service(
            hostname="ratings.default.svc.cluster.local",
            ports=(ServicePort(9080),),
            short_name="ratings",
        ),
        Service(hostname="api.example.com", ports=(ServicePort(80),), source="ServiceEntry"),
    ),
    instances=tuple(
        WorkloadInstance(
            name=f"reviews-{v}",
            workload=f"reviews-{v}",
            address="127.0.0.1",
            ports={9080: 20000 + i, 9090: 21000 + i},
            services=("reviews.default.svc.cluster.local",),
            labels={"app": "reviews", "version": v},
            has_sidecar=True,
        )
        for i, v in enumerate(SUBSETS)
    ),
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    vss=st.lists(vs, max_size=3),
    drs=st.lists(dr, max_size=2),
    mode=st.sampled_from(["sidecar", "gateway", "standalone"]),
)
def test_translate_output_always_validates(vss: list[Any], drs: list[Any], mode: str) -> None:
    text = "---\n".join(
        [_doc("VirtualService", f"vs{i}", s) for i, s in enumerate(vss)]
        + [_doc("DestinationRule", f"dr{i}", s) for i, s in enumerate(drs)]
        + [
            _doc(
                "Gateway",
                "gw",
                {
                    "selector": {"app": "productpage"},
                    "servers": [
                        {"port": {"number": 80, "name": "http", "protocol": "HTTP"}, "hosts": ["*"]}
                    ],
                },
            )
        ]
    )
    result = load_text(text, "prop.yaml")
    node = Node(id="p", workload="productpage-v1", labels={"app": "productpage"}, mode=mode)  # type: ignore[arg-type]
    proxy = ProxyNode(node=node, outbound_port=15001, local_ports={"ratings:9080": 15100})
    snap = translate(proxy, PushContext(resources=tuple(result.resources), registry=REGISTRY))
    assert from_builtins(to_builtins(snap)) == snap
    assert (
        translate(proxy, PushContext(resources=tuple(result.resources), registry=REGISTRY)) == snap
    )
    # and the analyzer copes with anything that loads, locating every problem
    for problem in analyze(result.resources, REGISTRY):
        assert problem.file == "prop.yaml" and problem.line >= 1 and problem.message
