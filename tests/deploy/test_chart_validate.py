"""The chart's manifests against Kubernetes' own schemas (``kubernetes-validate``), golden files
of the rendered chart, and RBAC that covers what the control plane watches.

``helm`` is not packaged for Debian (no ``helm`` in the package lists this project can install
from), so the chart is rendered by diktyo's own renderer (``install.render_chart``, which
implements the plain value substitution the templates use and refuses anything else); the
golden files are its output. They are what ``helm template`` prints for these values up to
YAML formatting, but helm itself has not rendered them here.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any

import pytest

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate is a test dependency (pip install -e '.[test]')")

from diktyo.control.ingest.kubernetes import CONFIG_RESOURCES, CORE_RESOURCES  # noqa: E402
from diktyo.control.inject import install  # noqa: E402
from diktyo.control.inject.manifest import dump_docs, inject_manifest, load_docs  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "diktyo"
TESTDATA = Path(__file__).parent / "testdata"
INJECT_DATA = REPO / "tests" / "control" / "inject" / "testdata"
# the oldest Kubernetes diktyo's manifests claim (native probes' grpc field, EndpointSlice v1),
# and the newest the schemas know
K8S_VERSIONS = ("1.27.0", kubernetes_validate.latest_version())
# fixed, fake base64 so the golden files do not change with every run (not real keys)
FIXED = ["webhook.caBundle=Q0EtQlVORExF", "webhook.tlsCrt=VExTLUNSVA==", "webhook.tlsKey=VExTLUtFWQ=="]
CASES = {
    "default": ("diktyo-system", FIXED),
    "overrides": ("mesh", [*FIXED, "image.repository=registry.example.com/diktyo", "image.tag=1.2.3",
                           "replicaCount=3", "tracing.sampling=0.5", "trustDomain=corp.example",
                           "webhook.failurePolicy=Ignore", "proxy.resources.limits.memory=512Mi"]),
}


_IANA_SVC_NAME = re.compile(r"^(?=.{1,15}$)(?=.*[a-z])[a-z0-9]+(-[a-z0-9]+)*$")


def _containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = obj.get("spec") or {}
    pod = (spec.get("template") or {}).get("spec") or spec
    return list(pod.get("containers") or []) + list(pod.get("initContainers") or [])


def _port_name_problems(obj: dict[str, Any]) -> list[str]:
    """Container port names the API server refuses (IANA_SVC_NAME: at most 15 characters,
    lower case letters, digits and inner dashes, one letter at least); the OpenAPI schemas
    kubernetes-validate uses do not carry this rule."""
    return [p["name"] for c in _containers(obj) for p in c.get("ports") or []
            if "name" in p and not _IANA_SVC_NAME.match(p["name"])]


def _validate(obj: dict[str, Any], version: str) -> None:
    bad = _port_name_problems(obj)
    assert not bad, f"{obj['kind']}/{obj['metadata'].get('name') or obj['metadata'].get('generateName')}: port names the API server refuses: {bad}"
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = "/".join(str(p) for p in exc.path)
        pytest.fail(f"{obj['kind']}/{obj['metadata'].get('name') or obj['metadata'].get('generateName')} invalid for Kubernetes {version} "
                    f"at {where}: {exc.message}")


def _golden(path: Path, actual: str) -> None:
    if os.environ.get("DIKTYO_REFRESH_GOLDEN") == "1" or not path.exists():
        path.write_text(actual, encoding="utf-8")
        if os.environ.get("DIKTYO_REFRESH_GOLDEN") != "1":
            pytest.fail(f"golden file {path.name} was missing and has been written; check it in")
        return
    expected = path.read_text(encoding="utf-8")
    if expected != actual:
        diff = "".join(difflib.unified_diff(expected.splitlines(keepends=True),
                                            actual.splitlines(keepends=True),
                                            fromfile=f"{path.name} (golden)", tofile="rendered"))
        pytest.fail(f"{path.name} differs (DIKTYO_REFRESH_GOLDEN=1 to accept):\n{diff}")


@pytest.mark.parametrize("case", sorted(CASES))
def test_rendered_chart_golden(case: str) -> None:
    namespace, overrides = CASES[case]
    objs = install.render_chart(CHART, install.values_with(overrides), namespace)
    _golden(TESTDATA / f"chart.{case}.yaml", dump_docs(objs))


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_rendered_chart_validates(case: str, version: str) -> None:
    namespace, overrides = CASES[case]
    objs = install.render_chart(CHART, install.values_with(overrides), namespace)
    assert len(objs) == 7
    for obj in objs:
        _validate(obj, version)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_injected_workloads_validate(version: str) -> None:
    """Every injection golden input, injected, is still a valid Pod for the API server."""
    cases = sorted(INJECT_DATA.glob("*.in.yaml"))
    assert len(cases) >= 6
    for path in cases:
        for obj in inject_manifest(load_docs(path.read_text(encoding="utf-8"))):
            _validate(obj, version)


def test_checks_catch_what_the_api_server_rejects() -> None:
    """The checks above can fail: a port name over 15 characters (the sidecar's old
    ``http-diktyo-admin``, which the API server would have refused), a misspelt field."""
    (deploy,) = [o for o in install.render(install.DEFAULT_VALUES) if o["kind"] == "Deployment"]
    deploy["spec"]["template"]["spec"]["containers"][0]["ports"][0]["name"] = "http-diktyo-admin"
    assert _port_name_problems(deploy) == ["http-diktyo-admin"]
    kubernetes_validate.validate(deploy, K8S_VERSIONS[-1], strict=True)  # the schema misses it
    deploy["spec"]["template"]["spec"]["containers"][0]["ports"][0]["name"] = "http"
    deploy["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deploy, K8S_VERSIONS[-1], strict=True)


def test_cluster_role_covers_every_watched_resource() -> None:
    (role,) = [o for o in install.render(install.DEFAULT_VALUES) if o["kind"] == "ClusterRole"]
    for res in CORE_RESOURCES + CONFIG_RESOURCES:
        allowed = [r for r in role["rules"] if res.group in r["apiGroups"]
                   and ({"*", res.plural} & set(r["resources"]))]
        assert allowed and all({"list", "watch"} <= set(r["verbs"]) for r in allowed), str(res)


def test_install_dry_run_with_crds_validates() -> None:
    from diktyo.control.inject.crds import load_crds

    crds = load_crds((REPO / "deploy" / "crds" / "istio-crds.yaml").read_text(encoding="utf-8"))
    assert len(crds) == 8
    for crd in crds:
        _validate(crd, K8S_VERSIONS[-1])


def test_golden_files_are_the_charts() -> None:
    """The golden files parse back to exactly what the chart renders (no stale extra docs)."""
    for case, (namespace, overrides) in CASES.items():
        docs = load_docs((TESTDATA / f"chart.{case}.yaml").read_text(encoding="utf-8"))
        assert docs == install.render_chart(CHART, install.values_with(overrides), namespace)
