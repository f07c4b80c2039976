"""The kind table: used kinds load, recognised-but-unimplemented kinds are warned and ignored,
other Kubernetes kinds are noted, ``kind: List`` is expanded, Kubernetes Services are checked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from diktyo.api import load_text
from diktyo.api.kinds import KIND_TABLE, lookup
from diktyo.api.kubernetes import KubeServiceSpec

REPO = Path(__file__).resolve().parents[2]

IGNORED = [
    ("networking.istio.io/v1alpha3", "EnvoyFilter", "configPatches: []"),
    ("extensions.istio.io/v1alpha1", "WasmPlugin", "url: oci://example/plugin:1"),
]


@pytest.mark.parametrize(("api_version", "kind", "spec"), IGNORED, ids=[k for _, k, _ in IGNORED])
def test_unimplemented_istio_kind_is_a_warning_naming_it(
    api_version: str, kind: str, spec: str
) -> None:
    text = f"apiVersion: {api_version}\nkind: {kind}\nmetadata:\n  name: x\n  namespace: prod\nspec:\n  {spec}\n"
    result = load_text(text, "f.yaml")
    assert result.ok and result.resources == []
    (warning,) = result.errors
    assert warning.severity == "warning" and (warning.line, warning.col) == (2, 1)
    assert f"{kind} prod/x ignored" in warning.message


def test_unimplemented_kind_with_wrong_version_or_bad_name_is_an_error() -> None:
    result = load_text(
        "apiVersion: networking.istio.io/v1\nkind: EnvoyFilter\nmetadata: {name: x}\n", "f.yaml"
    )
    (err,) = result.errors
    assert err.severity == "error" and "unsupported apiVersion" in err.message
    assert "networking.istio.io/v1alpha3" in err.hint
    result = load_text(
        "apiVersion: networking.istio.io/v1alpha3\nkind: EnvoyFilter\nmetadata: {name: Bad_Name}\n",
        "f.yaml",
    )
    (err,) = result.errors
    assert err.severity == "error" and "invalid name 'Bad_Name'" in err.message


def test_unknown_kind_in_an_istio_group_is_an_error_with_a_suggestion() -> None:
    result = load_text(
        "apiVersion: networking.istio.io/v1alpha3\nkind: EnvoyFiltr\nmetadata: {name: x}\n"
    )
    (err,) = result.errors
    assert err.severity == "error" and "unknown kind 'EnvoyFiltr'" in err.message
    assert "EnvoyFilter" in err.hint


def test_kind_of_another_group_is_an_api_version_error() -> None:
    result = load_text("apiVersion: networking.istio.io/v1\nkind: HTTPRoute\nmetadata: {name: x}\n")
    (err,) = result.errors
    assert err.severity == "error" and "unsupported apiVersion" in err.message
    assert "gateway.networking.k8s.io/v1" in err.hint


def test_istio_operator_without_metadata_is_ignored_not_rejected() -> None:
    result = load_text("apiVersion: install.istio.io/v1alpha1\nkind: IstioOperator\nspec: {}\n")
    assert result.ok and [e.severity for e in result.errors] == ["warning"]
    assert "IstioOperator" in result.errors[0].message


def test_document_without_apiversion_and_kind_is_not_a_kubernetes_object() -> None:
    result = load_text("name: my-chart\nversion: 1.0.0\n", "Chart.yaml")
    (err,) = result.errors
    assert err.severity == "error" and "not a Kubernetes object" in err.message


SERVICE = """\
apiVersion: v1
kind: Service
metadata:
  name: reviews
  labels: {app: reviews}
spec:
  ports:
  - port: 9080
    name: http
    targetPort: 9081
    appProtocol: http
  selector:
    app: reviews
  sessionAffinity: None
"""


def test_kubernetes_service_is_loaded_with_its_ports() -> None:
    result = load_text(SERVICE, "svc.yaml")
    assert result.errors == []
    (res,) = result.resources
    assert (res.kind, res.namespace, res.name, res.api_version) == (
        "Service",
        "default",
        "reviews",
        "v1",
    )
    assert isinstance(res.spec, KubeServiceSpec)
    (port,) = res.spec.ports
    assert (port.port, port.name, port.target_port, port.app_protocol) == (
        9080,
        "http",
        9081,
        "http",
    )
    assert res.position("spec.ports[0].targetPort") == (10, 5)


@pytest.mark.parametrize(
    ("change", "line", "message"),
    [
        (("port: 9080", "port: 0"), 8, "out of range"),
        (("port: 9080", "port: '9080'"), 8, "expected an integer"),
        (("targetPort: 9081", "targetPort: http_port"), 10, "invalid targetPort"),
        (("targetPort: 9081", "targetPort: 70000"), 10, "out of range"),
        (("name: http\n", "name: HTTP\n"), 9, "invalid port name"),
    ],
)
def test_kubernetes_service_fields_are_checked(
    change: tuple[str, str], line: int, message: str
) -> None:
    result = load_text(SERVICE.replace(*change), "svc.yaml")
    (err,) = result.errors
    assert err.severity == "error" and err.line == line and message in err.message


def test_multi_port_service_needs_port_names_and_unique_ports() -> None:
    two = SERVICE.replace("    appProtocol: http\n", "    appProtocol: http\n  - port: 9443\n")
    (err,) = load_text(two, "svc.yaml").errors
    assert "port 9443 needs a name" in err.message
    dup = SERVICE.replace(
        "    appProtocol: http\n", "    appProtocol: http\n  - port: 9080\n    name: other\n"
    )
    (err,) = load_text(dup, "svc.yaml").errors
    assert "duplicate port 9080/TCP" in err.message
    udp = SERVICE.replace(
        "    appProtocol: http\n",
        "    appProtocol: http\n  - port: 53\n    name: dns\n    protocol: UDP\n",
    )
    assert load_text(udp, "svc.yaml").errors == []


def test_other_kubernetes_kinds_are_info_notes() -> None:
    result = load_text(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: reviews-v1}\n---\n"
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: bookinfo-reviews}\n",
        "k.yaml",
    )
    assert result.ok and result.resources == []
    assert [(e.severity, e.line) for e in result.errors] == [("info", 2), ("info", 6)]
    assert "ServiceAccount bookinfo-reviews" in result.errors[1].message


LIST = """\
apiVersion: v1
kind: List
items:
- apiVersion: networking.istio.io/v1
  kind: VirtualService
  metadata: {name: reviews}
  spec:
    hosts: [reviews]
    http:
    - route:
      - destination: {host: reviews}
- apiVersion: networking.istio.io/v1
  kind: DestinationRule
  metadata: {name: reviews}
  spec:
    host: reviews
    trafficPolicy:
      loadBalancer: {simple: ROUND_ROBINN}
- apiVersion: v1
  kind: Service
  metadata: {name: reviews}
  spec:
    ports: [{port: 9080, name: http}]
- just a string
"""


def test_list_is_expanded_and_items_keep_their_positions() -> None:
    result = load_text(LIST, "list.yaml")
    assert [(r.kind, r.name, r.line) for r in result.resources] == [
        ("VirtualService", "reviews", 4),
        ("Service", "reviews", 19),
    ]
    assert result.resources[0].position("spec.http[0].route[0].destination") == (11, 9)
    bad_dr, bad_item = result.errors
    assert (bad_dr.line, bad_dr.col) == (18, 22) and "ROUND_ROBINN" in bad_dr.message
    assert bad_item.line == 24 and "must be a mapping" in bad_item.message


def test_list_after_other_documents_keeps_file_lines() -> None:
    text = "apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n---\n" + LIST
    result = load_text(text, "list.yaml")
    assert [r.line for r in result.resources] == [8, 23]


def test_kind_table_rows_are_unique_and_used_rows_have_models() -> None:
    keys = [(row.group, row.kind) for row in KIND_TABLE]
    assert len(keys) == len(set(keys))
    for row in KIND_TABLE:
        assert row.used or row.reason, f"{row.kind}: an ignored kind says why"
        assert lookup(row.group, row.kind) is row


def _analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "diktyo.cli.main", "analyze", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


def test_analyze_exits_0_on_ignored_kinds_and_shows_notes_with_v(tmp_path: Path) -> None:
    (tmp_path / "ef.yaml").write_text(
        "apiVersion: networking.istio.io/v1alpha3\nkind: EnvoyFilter\n"
        "metadata: {name: ratelimit, namespace: istio-system}\nspec: {configPatches: []}\n"
        "---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: reviews-v1}\n"
    )
    proc = _analyze(str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Warning [DKT0002] (EnvoyFilter istio-system/ratelimit " in proc.stdout or (
        "Warning [DKT0002]" in proc.stdout and "EnvoyFilter istio-system/ratelimit" in proc.stdout
    ), proc.stdout
    assert "Deployment" not in proc.stdout
    proc = _analyze("-v", str(tmp_path))
    assert proc.returncode == 0
    assert (
        "Info [DKT0002]" in proc.stdout
        and "apps/v1 Deployment reviews-v1 is not a mesh resource; ignored" in proc.stdout
    )
