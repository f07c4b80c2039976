"""WorkloadEntry and WorkloadGroup are implemented kinds: Istio's CRD schema, then its CEL rules."""

from __future__ import annotations

import pytest

from diktyo.api import load_text
from diktyo.api.workloads import WorkloadGroup

WE = "apiVersion: networking.istio.io/{v}\nkind: WorkloadEntry\nmetadata: {name: w}\nspec:\n"
WG = "apiVersion: networking.istio.io/{v}\nkind: WorkloadGroup\nmetadata: {name: g}\nspec:\n"


def errors(doc: str) -> list[tuple[int, str, str]]:
    return [(e.line, e.field, e.message) for e in load_text(doc, "f.yaml").errors]


@pytest.mark.parametrize("version", ["v1", "v1beta1", "v1alpha3"])
def test_both_kinds_load_in_every_istio_version(version: str) -> None:
    we = WE.replace("{v}", version) + "  address: 10.0.0.1\n  ports: {http: 8080}\n"
    wg = WG.replace("{v}", version) + (
        "  metadata: {labels: {app: r}, annotations: {a: b}}\n"
        "  template: {ports: {http: 8080}, serviceAccount: r-sa}\n"
        "  probe: {periodSeconds: 2, failureThreshold: 2, httpGet: {port: 8080, path: /ok}}\n"
    )
    result = load_text(we + "---\n" + wg, "f.yaml")
    assert result.ok and result.errors == []
    entry, group = result.resources
    assert (entry.kind, entry.spec.ports) == ("WorkloadEntry", {"http": 8080})
    assert isinstance(group.spec, WorkloadGroup)
    assert group.spec.template.service_account == "r-sa"
    probe = group.spec.probe
    assert probe is not None and probe.http_get is not None and probe.http_get.path == "/ok"
    # Istio's agent defaults for what is unset
    assert probe.effective() == {
        "initial_delay": 0.0,
        "timeout": 1.0,
        "period": 2.0,
        "success_threshold": 1.0,
        "failure_threshold": 2.0,
    }


def test_metadata_annotations_and_status_are_kept() -> None:
    doc = (
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata:\n  name: w\n"
        "  annotations: {istio.io/autoRegistrationGroup: g}\n"
        "spec: {address: 10.0.0.1}\n"
        "status: {conditions: [{type: Healthy, status: 'True'}]}\n"
    )
    (res,) = load_text(doc).resources
    assert res.annotations == {"istio.io/autoRegistrationGroup": "g"}
    assert res.status == {"conditions": [{"type": "Healthy", "status": "True"}]}


@pytest.mark.parametrize(
    ("doc", "line", "field", "message"),
    [
        # Istio's CRD schema (structural): types, unknown fields, required, oneOf
        (WE + "  address: 10.0.0.1\n  ports: {http: -1}\n", 6, "spec.ports.http",
         "value -1 out of range [0, 4294967295]"),
        (WE + "  adress: 10.0.0.1\n", 5, "spec.adress", "unknown field 'adress'"),
        (WG + "  probe: {httpGet: {port: 80}}\n", 4, "spec.template",
         "missing required field 'template'"),
        (WG + "  template: {}\n  probe: {httpGet: {port: 80}, tcpSocket: {port: 80}}\n", 6,
         "spec.probe", "only one of exec, grpc, httpGet, tcpSocket may be set"),
        (WG + "  template: {}\n  probe: {httpGet: {path: /}}\n", 6,
         "spec.probe.httpGet.port", "missing required field 'port'"),
        # the CRD's CEL rules (the models)
        (WE + "  ports: {http: 80}\n", 4, "spec", "Address is required"),
        (WE + "  address: 10.0.0.1\n  ports: {http: 70000}\n", 4, "spec",
         "port 70000 must be between 1-65535"),
        (WE + "  address: unix://relative\n", 4, "spec",
         "UDS must be an absolute path or abstract socket"),
        (WE + "  address: unix:///run/app.sock\n  ports: {http: 80}\n", 4, "spec",
         "UDS may not include ports"),
        (WG + "  template: {ports: {http: 0}}\n", 5, "spec.template",
         "port must be between 1-65535"),
        (WG + "  template: {}\n  probe: {httpGet: {port: 80, scheme: FTP}}\n", 6,
         "spec.probe.httpGet", "scheme must be one of [HTTP, HTTPS]"),
        (WG + "  template: {}\n  probe: {tcpSocket: {port: 0}}\n", 6, "spec.probe.tcpSocket",
         "port must be between 1-65535"),
    ],
)  # fmt: skip
def test_invalid_documents_name_line_field_and_rule(
    doc: str, line: int, field: str, message: str
) -> None:
    (got,) = errors(doc.replace("{v}", "v1"))
    assert got[0] == line and got[1] == field and message in got[2], got
