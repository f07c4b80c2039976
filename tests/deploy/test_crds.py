"""deploy/crds/istio-crds.yaml: structurally valid CRDs, fresh, and Istio's Bookinfo samples validate."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from ruamel.yaml import YAML

from diktyo.control.inject import crds

REPO = Path(__file__).resolve().parents[2]
CRD_FILE = REPO / "deploy" / "crds" / "istio-crds.yaml"
SHARED = REPO.parent / "shared" / "istio"
BOOKINFO = SHARED / "bookinfo"


@pytest.fixture(scope="module")
def crd_text() -> str:
    return CRD_FILE.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def all_crds(crd_text: str) -> list[dict[str, Any]]:
    return crds.load_crds(crd_text)


def _validator(all_crds: list[dict[str, Any]], api_version: str, kind: str,
               strict: bool) -> jsonschema.Draft202012Validator:
    _, ver = crds.find_crd(all_crds, api_version, kind)
    schema = crds.to_json_schema(ver["schema"]["openAPIV3Schema"], strict=strict)
    return jsonschema.Draft202012Validator(schema)


def _errors(all_crds: list[dict[str, Any]], obj: dict[str, Any], strict: bool = True) -> list[str]:
    v = _validator(all_crds, obj["apiVersion"], obj["kind"], strict)
    body = {k: val for k, val in obj.items() if k not in ("apiVersion", "kind", "metadata")}
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(body)]


def test_header_keeps_licence_note(crd_text: str) -> None:
    assert "Apache License, Version 2.0" in crd_text.split("---", 1)[0]


def test_every_kind_present_once(all_crds: list[dict[str, Any]]) -> None:
    got = [(c["spec"]["group"], c["spec"]["names"]["kind"]) for c in all_crds]
    assert sorted(got) == sorted(crds.KINDS)


def test_crds_structurally_valid(all_crds: list[dict[str, Any]]) -> None:
    for crd in all_crds:
        assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
        assert crd["kind"] == "CustomResourceDefinition"
        spec, names = crd["spec"], crd["spec"]["names"]
        assert crd["metadata"]["name"] == f"{names['plural']}.{spec['group']}"
        assert spec["group"] in ("networking.istio.io", "security.istio.io")
        assert spec["scope"] == "Namespaced"
        for field in ("kind", "listKind", "plural", "singular"):
            assert names.get(field), f"{crd['metadata']['name']}: names.{field} missing"
        assert names["singular"] == names["plural"][:-1] or names["plural"].endswith("ies")
        versions = spec["versions"]
        assert sum(1 for v in versions if v["storage"]) == 1, "exactly one storage version"
        assert any(v["name"] == "v1" for v in versions) or names["kind"] == "RequestAuthentication"
        for ver in versions:
            schema = ver["schema"]["openAPIV3Schema"]
            assert schema["type"] == "object"
            assert schema["properties"]["spec"]["type"] == "object"
            assert ver["served"] is True
            # the converted schema is itself a valid JSON Schema
            jsonschema.Draft202012Validator.check_schema(crds.to_json_schema(schema))


def test_file_is_fresh() -> None:
    source = SHARED / "customresourcedefinitions.gen.yaml"
    if not source.is_file():
        pytest.skip(f"{source} not present (shared/ sits beside the repository in CI)")
    assert crds.generate(source.read_text(encoding="utf-8")) == CRD_FILE.read_text(encoding="utf-8"), (
        "deploy/crds/istio-crds.yaml is stale: run python -m diktyo.control.inject.crds")


def test_select_names_missing_kinds() -> None:
    with pytest.raises(ValueError, match="VirtualService"):
        crds.select_crds("apiVersion: v1\nkind: ConfigMap\n")


def _bookinfo_docs() -> list[tuple[str, dict[str, Any]]]:
    if not BOOKINFO.is_dir():
        return []
    out = []
    for path in sorted(BOOKINFO.glob("*.yaml")):
        for doc in YAML(typ="safe").load_all(io.StringIO(path.read_text(encoding="utf-8"))):
            if doc:
                out.append((f"{path.name}:{doc['kind']}/{doc['metadata']['name']}", doc))
    return out


BOOKINFO_DOCS = _bookinfo_docs()


@pytest.mark.skipif(not BOOKINFO_DOCS, reason="shared/istio/bookinfo not beside the repository")
def test_bookinfo_samples_validate(all_crds: list[dict[str, Any]]) -> None:
    """As the API server checks them (unknown fields pruned), every sample is valid.

    Strictly (``kubectl --validate=strict``) the only finding is the abort's deprecated
    ``percent`` field, which Istio's own CRD no longer has (the server prunes it).
    """
    assert len(BOOKINFO_DOCS) >= 12
    strict_findings = []
    for name, doc in BOOKINFO_DOCS:
        assert _errors(all_crds, doc, strict=False) == [], name
        strict_findings += [f"{name}: {e}" for e in _errors(all_crds, doc, strict=True)]
    assert strict_findings == [
        ("virtual-service-ratings-test-abort.yaml:VirtualService/ratings: spec/http/0/fault/abort: "
         "Additional properties are not allowed ('percent' was unexpected)")
    ]


@pytest.mark.parametrize(
    ("obj", "needle"),
    [
        ({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
          "spec": {"hosts": ["r"], "http": [{"route": [{"destination": {"host": "r"}, "wieght": 5}]}]}},
         "wieght"),
        ({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
          "spec": {"hosts": "reviews"}}, "not of type 'array'"),
        ({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
          "spec": {"host": "r", "trafficPolicy": {"loadBalancer": {"simple": "FASTEST"}}}}, "FASTEST"),
        ({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
          "spec": {"mtls": {"mode": "STRICTER"}}}, "STRICTER"),
    ],
)
def test_schema_rejects_bad_objects(all_crds: list[dict[str, Any]], obj: dict[str, Any], needle: str) -> None:
    errors = _errors(all_crds, obj)
    assert errors and any(needle in e for e in errors), errors


def test_int_or_string_and_every_kind_minimal(all_crds: list[dict[str, Any]]) -> None:
    ok = [
        {"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
         "spec": {"hosts": ["api.example.com"], "ports": [{"number": 443, "name": "tls", "protocol": "TLS"}],
                  "resolution": "DNS", "location": "MESH_EXTERNAL"}},
        {"apiVersion": "networking.istio.io/v1", "kind": "Gateway",
         "spec": {"selector": {"istio": "ingressgateway"},
                  "servers": [{"port": {"number": 80, "name": "http", "protocol": "HTTP"}, "hosts": ["*"]}]}},
        {"apiVersion": "networking.istio.io/v1", "kind": "Sidecar",
         "spec": {"egress": [{"hosts": ["./*", "istio-system/*"]}]}},
        {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
         "spec": {"action": "ALLOW", "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/default/sa/x"]}}]}]}},
        {"apiVersion": "security.istio.io/v1", "kind": "RequestAuthentication",
         "spec": {"jwtRules": [{"issuer": "https://issuer", "jwksUri": "https://issuer/jwks"}]}},
        {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
         "spec": {"host": "r", "trafficPolicy": {"connectionPool": {"tcp": {"maxConnections": 1}},
                                                   "portLevelSettings": [{"port": {"number": 9080}}]}}},
    ]
    for obj in ok:
        assert _errors(all_crds, obj) == [], obj["kind"]
