"""deploy/helm/diktyo: templates render (value-substitution subset) to the same objects as
``diktyo install --dry-run``; every object is a well-formed Kubernetes object; the commands
in the containers parse with diktyo's own argument parsers. No helm binary, no cluster."""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

import diktyo
from diktyo.cli.main import build_parser
from diktyo.control.inject import install
from diktyo.control.inject.manifest import load_docs
from diktyo.control.inject.webhook import build_parser as webhook_parser
from diktyo.control.inject.webhook import config_from_args

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "diktyo"
CLUSTER_SCOPED = {"ClusterRole", "ClusterRoleBinding", "MutatingWebhookConfiguration", "Namespace",
                  "CustomResourceDefinition"}


def _key(o: dict[str, Any]) -> tuple[str, str]:
    return o["kind"], o["metadata"]["name"]


def _check_object(o: Any) -> None:
    assert isinstance(o, dict)
    assert isinstance(o.get("apiVersion"), str) and o["apiVersion"]
    assert isinstance(o.get("kind"), str) and o["kind"][0].isupper()
    meta = o["metadata"]
    assert isinstance(meta["name"], str) and meta["name"]
    assert len(meta["name"]) <= 253 and meta["name"] == meta["name"].lower()
    if o["kind"] in CLUSTER_SCOPED:
        assert "namespace" not in meta, _key(o)
    else:
        assert meta.get("namespace"), _key(o)


def test_chart_metadata_matches_package() -> None:
    (chart,) = load_docs((CHART / "Chart.yaml").read_text(encoding="utf-8"))
    assert chart["apiVersion"] == "v2" and chart["name"] == "diktyo"
    assert chart["appVersion"] == install.APP_VERSION == diktyo.__version__
    (values,) = load_docs((CHART / "values.yaml").read_text(encoding="utf-8"))
    assert values == install.DEFAULT_VALUES, "values.yaml and install.DEFAULT_VALUES drifted apart"


def test_chart_crds_are_the_repositorys() -> None:
    crd = CHART / "crds" / "istio-crds.yaml"
    assert crd.resolve() == (REPO / "deploy" / "crds" / "istio-crds.yaml").resolve()


@pytest.mark.parametrize(
    ("namespace", "overrides"),
    [("diktyo-system", []),
     ("mesh", ["image.repository=registry.example.com/diktyo", "image.tag=1.2.3", "replicaCount=3",
               "tracing.sampling=0.5", "trustDomain=corp.example", "webhook.failurePolicy=Ignore",
               "webhook.caBundle=Q0E=", "proxy.resources.limits.memory=512Mi", "logLevel=debug"])],
)
def test_chart_renders_like_install(namespace: str, overrides: list[str]) -> None:
    values = install.values_with(overrides)
    chart = sorted(install.render_chart(CHART, values, namespace), key=_key)
    python = sorted(install.render(values, namespace), key=_key)
    assert [_key(o) for o in chart] == [_key(o) for o in python]
    for a, b in zip(chart, python, strict=True):
        assert a == b, _key(a)
    for o in chart:
        _check_object(o)


def test_rendered_objects() -> None:
    objs = {o["kind"]: o for o in install.render(install.values_with(["replicaCount=2"]), "mesh")}
    assert set(objs) == {"ClusterRole", "ClusterRoleBinding", "ServiceAccount", "Secret", "Service",
                         "Deployment", "MutatingWebhookConfiguration"}
    rules = objs["ClusterRole"]["rules"]
    granted = {(g, r) for rule in rules for g in rule["apiGroups"] for r in rule["resources"]
               if "watch" in rule["verbs"]}
    for need in [("", "services"), ("", "pods"), ("", "namespaces"), ("discovery.k8s.io", "endpointslices"),
                 ("networking.istio.io", "*"), ("security.istio.io", "*")]:
        assert need in granted
    assert objs["Deployment"]["spec"]["replicas"] == 2
    hooks = objs["MutatingWebhookConfiguration"]["webhooks"]
    assert hooks[0]["namespaceSelector"] == {"matchLabels": {"istio-injection": "enabled"}}
    assert hooks[1]["namespaceSelector"]["matchLabels"] == {"diktyo-injection": "enabled"}
    for hook in hooks:
        assert hook["clientConfig"]["service"] == {"name": "diktyo", "namespace": "mesh",
                                                   "path": "/inject", "port": 443}
        assert hook["admissionReviewVersions"] == ["v1"] and hook["sideEffects"] == "None"
        assert hook["rules"][0]["resources"] == ["pods"] and hook["rules"][0]["operations"] == ["CREATE"]
    svc_ports = {p["name"]: p for p in objs["Service"]["spec"]["ports"]}
    assert svc_ports["https-webhook"]["port"] == 443 and svc_ports["https-webhook"]["targetPort"] == 15017
    # the control plane pod itself is never injected
    assert objs["Deployment"]["spec"]["template"]["metadata"]["labels"]["sidecar.istio.io/inject"] == "false"


def test_container_commands_parse_with_diktyos_parsers() -> None:
    values = install.values_with(["tracing.sampling=0.5", "proxy.resources.requests.cpu=50m"])
    (deploy,) = [o for o in install.render(values, "mesh") if o["kind"] == "Deployment"]
    containers = {c["name"]: c for c in deploy["spec"]["template"]["spec"]["containers"]}
    cp = build_parser().parse_args(containers["discovery"]["args"])
    assert cp.command == "control-plane" and cp.port == 15010 and cp.host == "0.0.0.0"
    assert cp.sidecar_auth == "token"  # sidecars prove themselves (projected token, TokenReview)
    args = webhook_parser().parse_args(containers["injector"]["args"])
    assert args.port == 15017 and args.cert.endswith("tls.crt")
    cfg = config_from_args(args)
    assert cfg.control_plane == "http://diktyo.mesh.svc:15010"
    assert cfg.image == "diktyo/diktyo:0.1.0" and cfg.tracing_sampling == 0.5 and cfg.cpu_request == "50m"
    mounts = {m["mountPath"] for m in containers["injector"]["volumeMounts"]}
    assert str(Path(args.cert).parent) in mounts


def test_notes_render() -> None:
    ctx = {"Values": install.DEFAULT_VALUES, "Release": {"Namespace": "mesh", "Name": "diktyo"},
           "Chart": {"AppVersion": install.APP_VERSION}}
    text = install.render_template((CHART / "templates" / "NOTES.txt").read_text(encoding="utf-8"), ctx)
    assert "namespace mesh" in text and "{{" not in text


def test_subset_renderer_rejects_other_template_features() -> None:
    ctx = {"Values": {"a": {"b": 1}}, "Release": {}, "Chart": {}}
    assert install.render_template("x: {{ .Values.a.b }}", ctx) == "x: 1"
    with pytest.raises(install.ChartError, match="outside the supported template subset"):
        install.render_template("{{ if .Values.a }}x{{ end }}", ctx, "t.yaml")
    with pytest.raises(install.ChartError, match="not defined"):
        install.render_template("{{ .Values.a.c }}", ctx)
    with pytest.raises(install.ChartError, match="map or list"):
        install.render_template("{{ .Values.a }}", ctx)


def test_values_with_errors() -> None:
    with pytest.raises(ValueError, match="KEY=VALUE"):
        install.values_with(["image.tag"])
    with pytest.raises(ValueError, match="unknown value"):
        install.values_with(["image.nope=1"])
    with pytest.raises(ValueError, match="not a number"):
        install.values_with(["replicaCount=many"])


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "diktyo.cli.main", "install", *args],
                          capture_output=True, text=True, timeout=60, check=False)


def test_install_dry_run_output() -> None:
    res = _cli("--dry-run", "-n", "mesh", "--set", "replicaCount=2")
    assert res.returncode == 0, res.stderr
    docs = load_docs(res.stdout)
    for o in docs:
        _check_object(o)
    assert docs[0] == {"apiVersion": "v1", "kind": "Namespace",
                       "metadata": {"name": "mesh", "labels": {"istio-injection": "disabled"}}}
    by_kind = {o["kind"]: o for o in docs}
    assert by_kind["Deployment"]["spec"]["replicas"] == 2
    # the webhook's caBundle is the CA that signed the Secret's serving certificate
    ca = x509.load_pem_x509_certificate(
        base64.b64decode(by_kind["MutatingWebhookConfiguration"]["webhooks"][0]["clientConfig"]["caBundle"]))
    leaf = x509.load_pem_x509_certificate(base64.b64decode(by_kind["Secret"]["data"]["tls.crt"]))
    pub = ca.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    leaf.verify_directly_issued_by(ca)
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "diktyo.mesh.svc" in sans.get_values_for_type(x509.DNSName)
    assert base64.b64decode(by_kind["Secret"]["data"]["tls.key"]).startswith(b"-----BEGIN PRIVATE KEY")


def test_install_with_crds() -> None:
    res = _cli("--dry-run", "--with-crds")
    assert res.returncode == 0, res.stderr
    head = res.stdout[:200000]
    assert "kind: CustomResourceDefinition" in head and "virtualservices.networking.istio.io" in head
    kinds = [line for line in res.stdout.splitlines() if line.startswith("kind: ")]
    assert kinds.count("kind: CustomResourceDefinition") == 8 and "kind: Namespace" in kinds


def test_install_values_file(tmp_path: Path) -> None:
    vals = tmp_path / "values.yaml"
    vals.write_text("image:\n  tag: '9.9'\nproxy:\n  resources:\n    limits:\n      memory: 2Gi\n",
                    encoding="utf-8")
    res = _cli("--dry-run", "-f", str(vals), "--set", "replicaCount=4")
    assert res.returncode == 0, res.stderr
    (deploy,) = [o for o in load_docs(res.stdout) if o["kind"] == "Deployment"]
    assert deploy["spec"]["replicas"] == 4
    injector = deploy["spec"]["template"]["spec"]["containers"][1]
    assert injector["image"] == "diktyo/diktyo:9.9"
    assert injector["args"][injector["args"].index("--proxy-memory-limit") + 1] == "2Gi"
    vals.write_text("image:\n  tagg: x\n", encoding="utf-8")
    res = _cli("--dry-run", "-f", str(vals))
    assert res.returncode == 2 and "unknown key 'image.tagg'" in res.stderr
    vals.write_text("image: [\n", encoding="utf-8")
    res = _cli("--dry-run", "-f", str(vals))
    assert res.returncode == 2 and "not valid YAML" in res.stderr


def test_install_errors() -> None:
    res = _cli()
    assert res.returncode == 2 and "--dry-run | kubectl apply -f -" in res.stderr
    res = _cli("--dry-run", "--set", "image.nope=1")
    assert res.returncode == 2 and "unknown value" in res.stderr
    res = _cli("--dry-run", "--with-crds", "--crds", "/nonexistent/crds.yaml")
    assert res.returncode == 1 and "not found" in res.stderr
