"""One generator shared across proxies (PushTranslator) gives what a fresh one (``translate``) gives."""

from __future__ import annotations

from typing import Any

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_translate_property import REGISTRY, _doc, dr, vs
from translate_golden import TESTDATA, build_case

from diktyo.api import load_text
from diktyo.control.model import InboundPort, ProxyNode, PushContext
from diktyo.control.translate import translate
from diktyo.control.translate.cache import PushTranslator
from diktyo.snapshot.codec import encode
from diktyo.snapshot.model import Node

LABELS = [
    {"app": "productpage", "version": "v1"},
    {"app": "reviews", "version": "v2"},
    {"app": "productpage"},
    {},
]


def variants(proxy: ProxyNode) -> list[ProxyNode]:
    """Proxies that share views with ``proxy`` (other id and ports) and ones that do not."""
    out = [proxy]
    for i, labels in enumerate(LABELS):
        for ns in (proxy.node.namespace, "other"):
            for mode in ("sidecar", "gateway", "standalone"):
                node = msgspec.structs.replace(
                    proxy.node, id=f"v{i}-{ns}-{mode}", labels=labels, namespace=ns, mode=mode
                )
                out.append(
                    ProxyNode(
                        node=node,
                        outbound_port=15001 + i,
                        inbound=(InboundPort(9080, 15006 + i, 9081),) if i % 2 else (),
                        local_ports={"ratings:9080": 15100 + i} if i % 3 == 0 else {},
                        gateway_ports={80: 18080 + i},
                    )
                )
    return out


def check_same(pt: PushTranslator, proxies: list[ProxyNode], push: PushContext) -> None:
    for proxy in proxies:
        want = translate(proxy, push)
        built = pt.build(proxy, push)
        assert built.snapshot == want, proxy.node.id
        assert b"".join(built.parts()) == encode(want), proxy.node.id
        v = msgspec.structs.replace(want, version="9-x")
        assert b"".join(built.parts(version="9-x")) == encode(v)
        assert pt(proxy, push) == want


def test_golden_cases_and_their_variants_match_translate() -> None:
    pt = PushTranslator()
    cases = sorted(TESTDATA.glob("*.in.yaml"))
    assert cases
    for path in cases:
        proxy, push = build_case(path)
        proxies = variants(proxy)
        # twice, interleaved: the second round comes entirely from the views cache
        check_same(pt, proxies + proxies[::-1], push)


def test_one_view_per_distinct_labels_namespace_and_mode() -> None:
    proxy, push = build_case(TESTDATA / "bookinfo-all-v1.in.yaml")
    pt = PushTranslator()
    for i in range(50):
        node = msgspec.structs.replace(proxy.node, id=f"client-{i}", labels={"app": "client"})
        pt.build(ProxyNode(node=node, outbound_port=15000 + i), push)
    assert pt.views_built == 1
    node = msgspec.structs.replace(proxy.node, id="other", labels={"app": "other"})
    pt.build(ProxyNode(node=node), push)
    assert pt.views_built == 2
    # an equal push reuses the views; a different one starts afresh: nothing stale survives
    pt.build(ProxyNode(node=node), PushContext(push.resources, push.registry, version="golden"))
    assert pt.views_built == 2
    pt.build(ProxyNode(node=node), PushContext(push.resources, push.registry, version="2"))
    assert pt.views_built == 3


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    vss=st.lists(vs, max_size=3),
    drs=st.lists(dr, max_size=2),
    labels=st.lists(st.sampled_from(LABELS), min_size=1, max_size=4),
    modes=st.lists(st.sampled_from(["sidecar", "gateway", "standalone"]), min_size=1, max_size=3),
)
def test_any_config_matches_translate(
    vss: list[Any], drs: list[Any], labels: list[dict[str, str]], modes: list[str]
) -> None:
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
    push = PushContext(resources=tuple(result.resources), registry=REGISTRY, version="7")
    proxies = [
        ProxyNode(
            node=Node(id=f"p{i}-{j}", workload="w", labels=lab, mode=mode),  # type: ignore[arg-type]
            outbound_port=15001,
            local_ports={"ratings:9080": 15100} if i % 2 else {},
            gateway_ports={80: 18080},
        )
        for i, lab in enumerate(labels)
        for j, mode in enumerate(modes)
    ]
    check_same(PushTranslator(), proxies + proxies, push)
