"""Unimplemented Istio kinds are ignored, but only once their spec passes Istio's CRD schema
(what ``kubectl apply`` with strict field validation refuses, diktyo refuses too)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diktyo.api import load_text
from diktyo.api.crd_schema import _FILE, extract, schemas, validate
from diktyo.api.kinds import KIND_TABLE

CRDS = (
    Path(__file__).resolve().parents[2]
    / ".."
    / "shared"
    / "istio"
    / "customresourcedefinitions.gen.yaml"
)


def test_shipped_schemas_are_istios() -> None:
    if not CRDS.exists():
        pytest.skip(f"{CRDS} missing")
    kinds = {r.kind for r in KIND_TABLE if r.model is None and r.group.endswith("istio.io")}
    kinds &= set(schemas())  # rows implemented since the file was written need no schema
    want = extract(CRDS.read_text(encoding="utf-8"), kinds)
    got = {k: v for k, v in json.loads(_FILE.read_text()).items() if k in kinds}
    assert got == want, "regenerate: python -m diktyo.api.crd_schema " + str(CRDS)
    assert {"EnvoyFilter", "WasmPlugin", "ProxyConfig", "WorkloadEntry", "WorkloadGroup"} <= set(
        schemas()
    )


ENVOY_FILTER = """\
apiVersion: networking.istio.io/v1alpha3
kind: EnvoyFilter
metadata: {name: ratelimit, namespace: istio-system}
spec:
  workloadSelector:
    labels: {istio: ingressgateway}
  configPatches:
  - applyTo: HTTP_FILTER
    match:
      context: GATEWAY
      listener:
        filterChain:
          filter: {name: envoy.filters.network.http_connection_manager}
    patch:
      operation: INSERT_BEFORE
      value:
        name: envoy.filters.http.ratelimit
        typed_config: {domain: ratelimit}
"""


def test_valid_envoy_filter_is_ignored_with_a_warning() -> None:
    result = load_text(ENVOY_FILTER, "ef.yaml")
    assert [e.severity for e in result.errors] == ["warning"]


@pytest.mark.parametrize(
    ("change", "line", "field", "message"),
    [
        (
            ("applyTo: HTTP_FILTER", "applyTo: HTTP_FILTR"),
            8,
            "spec.configPatches[0].applyTo",
            "invalid value 'HTTP_FILTR'",
        ),
        (
            ("      context: GATEWAY", "      contxt: GATEWAY"),
            10,
            "spec.configPatches[0].match.contxt",
            "unknown field 'contxt'",
        ),
        (
            ("operation: INSERT_BEFORE", "operation: 3"),
            15,
            "spec.configPatches[0].patch.operation",
            "expected string",
        ),
        (
            ("      listener:", "      cluster: {service: x}\n      listener:"),
            9,
            "spec.configPatches[0].match",
            "only one of cluster, listener, routeConfiguration, waypoint may be set",
        ),
    ],
)
def test_envoy_filter_that_istio_rejects_is_an_error(
    change: tuple[str, str], line: int, field: str, message: str
) -> None:
    result = load_text(ENVOY_FILTER.replace(*change), "ef.yaml")
    (err,) = result.errors
    assert err.severity == "error" and err.field == field and message in err.message
    assert err.line == line and "EnvoyFilter CRD" in err.hint


def test_other_unimplemented_kinds_are_checked_too() -> None:
    def errors(doc: str) -> list[str]:
        return [e.message for e in load_text(doc).errors if e.severity == "error"]

    wasm = (
        "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {name: w}\nspec:\n"
    )
    assert errors(wasm + "  url: oci://x/y:1\n  sha256: abc\n") == [
        "'abc' does not match '(^$|^[a-f0-9]{64}$)'"
    ]
    assert errors(wasm + "  url: oci://x/y:1\n  phase: AUTHZ\n  priority: 10\n") == []


def test_validate_reports_paths_and_keeps_preserved_fields() -> None:
    schema = {
        "type": "object",
        "required": ["a"],
        "properties": {
            "a": {"type": "integer", "format": "int32"},
            "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
            "list": {"type": "array", "maxItems": 1, "items": {"type": "string"}},
        },
    }
    assert validate({"a": 1, "free": {"anything": [1, {"x": 2}]}}, schema) == []
    assert validate({"list": ["x", "y"], "b": 1}, schema) == [
        ("spec.a", "missing required field 'a'"),
        ("spec.list", "at most 1 items"),
        ("spec.b", "unknown field 'b'"),
    ]
    assert validate({"a": 2**31}, schema) == [
        ("spec.a", f"value {2**31} out of range [{-(2**31)}, {2**31 - 1}]")
    ]
