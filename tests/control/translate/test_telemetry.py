"""Telemetry API: which resources apply to a workload and how they merge (Istio's precedence)."""

from __future__ import annotations

import pytest

from diktyo.api import load_text
from diktyo.control.translate.telemetry import applicable, build_telemetry, literal_value
from diktyo.snapshot.model import AccessLog, MeshConfig, Node, Tracing


def telemetry(name: str, ns: str, spec: str) -> str:
    return (
        f"apiVersion: telemetry.istio.io/v1\nkind: Telemetry\n"
        f"metadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}\n---\n"
    )


def load(text: str) -> list:  # type: ignore[type-arg]
    result = load_text(text)
    assert result.ok, [str(e) for e in result.errors]
    return result.resources


MESH = telemetry(
    "mesh-default",
    "istio-system",
    "  tracing: [{randomSamplingPercentage: 10, customTags: {team: {literal: {value: mesh}}}}]\n"
    "  accessLogging: [{providers: [{name: envoy}]}]",
)
NS = telemetry(
    "shop",
    "shop",
    "  tracing: [{randomSamplingPercentage: 100}]\n"
    "  accessLogging: [{filter: {expression: 'response.code >= 400'}}]",
)
WORKLOAD = telemetry(
    "quiet-cart",
    "shop",
    "  selector: {matchLabels: {app: cart}}\n"
    "  accessLogging: [{disabled: true}]\n"
    "  tracing: [{customTags: {team: {literal: {value: cart}}}, disableSpanReporting: true}]",
)
RESOURCES = load(MESH + NS + WORKLOAD)


def node(ns: str, **labels: str) -> Node:
    return Node(id="x", workload="x", namespace=ns, labels=labels)


def test_applicable_widest_first_and_selector_scoped_to_its_namespace() -> None:
    assert [t.name for t in applicable(RESOURCES, node("shop", app="cart"))] == [
        "mesh-default", "shop", "quiet-cart",
    ]  # fmt: skip
    assert [t.name for t in applicable(RESOURCES, node("shop", app="web"))] == [
        "mesh-default", "shop",
    ]  # fmt: skip
    # a selector only selects workloads of its own namespace
    assert [t.name for t in applicable(RESOURCES, node("other", app="cart"))] == ["mesh-default"]


def test_namespace_overrides_mesh_and_workload_overrides_namespace() -> None:
    mesh = MeshConfig(tracing=Tracing(sampling=1.0), access_log=AccessLog(enabled=False))
    web = build_telemetry(RESOURCES, node("shop", app="web"), mesh)
    assert web is not None
    assert web.client_tracing.sampling == 100.0 and web.server_tracing.sampling == 100.0
    assert web.client_access_log.enabled and web.client_access_log.filter == "response.code >= 400"
    assert [(t.name, t.value) for t in web.client_tracing.custom_tags] == [("team", "mesh")]
    assert web.sources == ("istio-system/mesh-default", "shop/shop")
    cart = build_telemetry(RESOURCES, node("shop", app="cart"), mesh)
    assert cart is not None
    assert not cart.client_access_log.enabled and not cart.server_access_log.enabled
    assert cart.client_tracing.sampling == 100.0  # not set by the workload: the namespace's
    assert not cart.client_tracing.span_reporting
    assert [(t.name, t.value) for t in cart.client_tracing.custom_tags] == [("team", "cart")]
    other = build_telemetry(RESOURCES, node("other"), mesh)
    assert other is not None and other.client_tracing.sampling == 10.0
    assert other.client_access_log.enabled and other.client_access_log.filter == ""
    assert other.client_access_log.providers == ("envoy",)


def test_no_telemetry_keeps_the_mesh_file_defaults() -> None:
    assert build_telemetry(load(WORKLOAD), node("other"), MeshConfig()) is None


def test_mesh_file_values_are_the_starting_point() -> None:
    mesh = MeshConfig(tracing=Tracing(sampling=42.0), access_log=AccessLog(enabled=True))
    only_metrics = load(
        telemetry("m", "istio-system", "  metrics: [{overrides: [{disabled: true}]}]")
    )
    tel = build_telemetry(only_metrics, node("default"), mesh)
    assert tel is not None
    assert tel.client_tracing.sampling == 42.0 and tel.server_access_log.enabled


def test_match_mode_applies_to_one_direction() -> None:
    res = load(
        telemetry(
            "server-only",
            "default",
            "  accessLogging: [{match: {mode: SERVER}}]\n"
            "  tracing: [{match: {mode: CLIENT}, randomSamplingPercentage: 50}]",
        )
    )
    tel = build_telemetry(res, node("default"), MeshConfig())
    assert tel is not None
    assert tel.server_access_log.enabled and not tel.client_access_log.enabled
    assert (tel.client_tracing.sampling, tel.server_tracing.sampling) == (50.0, 1.0)


def test_metric_overrides_in_order_with_literal_upserts_only() -> None:
    res = load(
        MESH.replace(
            "  accessLogging",
            "  metrics: [{overrides: [{match: {metric: REQUEST_COUNT}, "
            "tagOverrides: {request_protocol: {operation: REMOVE}}}]}]\n  accessLogging",
        )
        + telemetry(
            "ns",
            "default",
            "  metrics:\n  - overrides:\n    - match: {metric: REQUEST_DURATION, mode: CLIENT}\n"
            "      disabled: true\n    - tagOverrides:\n"
            "        stage: {value: \"'canary'\"}\n        host: {value: request.host}",
        )
    )
    tel = build_telemetry(res, node("default"), MeshConfig())
    assert tel is not None
    first, second, third = tel.metrics
    assert (first.metric, first.remove) == ("REQUEST_COUNT", ("request_protocol",))
    assert (second.metric, second.mode, second.disabled) == ("REQUEST_DURATION", "CLIENT", True)
    assert third.metric == "ALL_METRICS" and third.upsert == {"stage": "canary"}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            "  selector: {matchLabels: {app: a}}\n  targetRef: {kind: Gateway, name: g}",
            "only one of targetRefs or selector can be set",
        ),
        ("  tracing: [{randomSamplingPercentage: 101}]", "<= 100"),
        (
            "  metrics: [{overrides: [{tagOverrides: {a: {operation: UPSERT}}}]}]",
            "value must be set when operation is UPSERT",
        ),
        (
            "  metrics: [{overrides: [{tagOverrides: {a: {operation: REMOVE, value: x}}}]}]",
            "value must not be set when operation is REMOVE",
        ),
        ("  metrics: [{overrides: [{match: {metric: REQUESTS}}]}]", "must be one of"),
        ("  accessLogging: [{disable: true}]", "did you mean 'disabled'"),
    ],
)
def test_istio_crd_rules(spec: str, message: str) -> None:
    result = load_text(telemetry("t", "default", spec))
    assert not result.ok
    text = " ".join(f"{e.message} {e.hint}" for e in result.errors)
    assert message in text, text


def test_v1alpha1_loads_too() -> None:
    text = telemetry("t", "default", "  tracing: [{randomSamplingPercentage: 5}]")
    assert load_text(text.replace("/v1\n", "/v1alpha1\n")).ok


def test_literal_value() -> None:
    assert literal_value("'canary'") == "canary"
    assert literal_value('"x"') == "x"
    assert literal_value("request.host") is None
