"""Conformance: every YAML file of Istio's samples (``../shared/istio/samples``) loads as Istio
would take it.

For each file, each document is classified independently of diktyo's loader (plain YAML, its
``apiVersion``/``kind``) and the loader must agree: a kind diktyo implements becomes a resource,
an Istio or Gateway API kind diktyo does not implement gives one warning naming it, any other
Kubernetes object gives one ``info`` note. Istio's samples are valid Istio config, so no file
may give an error, except the few listed in ``NOT_CONFIG`` with the reason (none of them is a
Kubernetes object Istio could accept either).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from diktyo.api import load_paths
from diktyo.api.kinds import lookup

SAMPLES = Path(__file__).resolve().parents[2] / ".." / "shared" / "istio" / "samples"
FILES = (
    sorted(p for p in SAMPLES.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())
    if SAMPLES.is_dir()
    else []
)

_HELM_TEMPLATE = (
    "a Helm chart template ('{{ ... }}' Go template syntax): YAML only once helm renders it"
)

# path under samples/ -> (what the loader must say, why Istio would not take it either)
NOT_CONFIG: dict[str, tuple[str, str]] = {
    "ambient-argo/tag-chart/Chart.yaml": (
        "missing required field 'kind'",
        "Helm chart metadata (name, version), read by helm, never applied to a cluster",
    ),
    "ambient-argo/tag-chart/values.yaml": (
        "not a Kubernetes object",
        "Helm chart values, input to helm's templates, never applied to a cluster",
    ),
    "ambient-argo/tag-chart/templates/mutatingwebhooks.yaml": ("YAML syntax error", _HELM_TEMPLATE),
    "ambient-argo/tag-chart/templates/shimservice.yaml": ("YAML syntax error", _HELM_TEMPLATE),
    "ambient-argo/tag-chart/templates/validatingwebhook.yaml": (
        "YAML syntax error",
        _HELM_TEMPLATE,
    ),
    "bookinfo/swagger.yaml": (
        "not a Kubernetes object",
        "the OpenAPI (swagger 2.0) description of Bookinfo's REST API, documentation only",
    ),
    "security/spire-trust-domain-federation/spire-base.yaml": (
        "not a Kubernetes object",
        "Helm values for SPIRE's charts (helm install -f), not a Kubernetes object",
    ),
    "security/spire-trust-domain-federation/spire-east.yaml": (
        "not a Kubernetes object",
        "Helm values for SPIRE's charts (helm install -f), not a Kubernetes object",
    ),
    "security/spire-trust-domain-federation/spire-west.yaml": (
        "not a Kubernetes object",
        "Helm values for SPIRE's charts (helm install -f), not a Kubernetes object",
    ),
}


def _rel(path: Path) -> str:
    return path.relative_to(SAMPLES).as_posix()


def _documents(path: Path) -> list[dict[str, Any]]:
    """Every object of the file as plain data, ``kind: List`` items included."""
    out: list[dict[str, Any]] = []
    for doc in YAML(typ="safe").load_all(path.read_text(encoding="utf-8")):
        if not isinstance(doc, dict):
            continue
        if doc.get("kind") == "List":
            out.extend(i for i in doc.get("items") or [] if isinstance(i, dict))
        else:
            out.append(doc)
    return out


def _expected(docs: list[dict[str, Any]]) -> tuple[list[tuple[str, str]], list[str], int]:
    """(used (kind, name) in order, ignored kinds, number of other objects)."""
    used: list[tuple[str, str]] = []
    ignored: list[str] = []
    other = 0
    for doc in docs:
        group, _, _ = str(doc.get("apiVersion", "")).rpartition("/")
        row = lookup(group, str(doc.get("kind", "")))
        if row is None:
            other += 1
        elif row.used:
            used.append((row.kind, str((doc.get("metadata") or {}).get("name", ""))))
        else:
            ignored.append(row.kind)
    return used, ignored, other


def test_samples_are_there() -> None:
    if not SAMPLES.is_dir():
        pytest.skip(f"{SAMPLES} missing (shared/ must sit beside the repo)")
    assert len(FILES) > 100
    for rel in NOT_CONFIG:
        assert (SAMPLES / rel).is_file(), f"stale NOT_CONFIG entry {rel}: remove it"


@pytest.mark.parametrize("path", FILES, ids=_rel)
def test_sample_loads_as_istio_takes_it(path: Path) -> None:
    result = load_paths([path])
    errors = [e for e in result.errors if e.severity == "error"]
    entry = NOT_CONFIG.get(_rel(path))
    if entry is not None:
        want, _reason = entry
        assert errors, f"{_rel(path)} now loads: drop it from NOT_CONFIG"
        assert all(want in e.message for e in errors), [str(e) for e in errors]
        return
    assert [str(e) for e in errors] == []
    used, ignored, other = _expected(_documents(path))
    assert [(r.kind, r.name) for r in result.resources] == used
    warnings = [e for e in result.errors if e.severity == "warning"]
    notes = [e for e in result.errors if e.severity == "info"]
    assert len(warnings) == len(ignored), [str(e) for e in warnings]
    for kind, warning in zip(ignored, warnings, strict=True):
        assert f"{kind} " in warning.message and " ignored: " in warning.message
    assert len(notes) == other, [str(e) for e in notes]
    text = path.read_text(encoding="utf-8").splitlines()
    for res in result.resources:
        assert res.file == str(path)
        line, col = res.positions["kind"]
        assert text[line - 1][col - 1 :].startswith("kind:")


def test_whole_samples_folder_loads_without_errors_beyond_the_listed_files() -> None:
    if not SAMPLES.is_dir():
        pytest.skip(f"{SAMPLES} missing")
    result = load_paths([SAMPLES])
    bad = {
        Path(e.file).relative_to(SAMPLES).as_posix() for e in result.errors if e.severity == "error"
    }
    assert bad == set(NOT_CONFIG)
    kinds = {r.kind for r in result.resources}
    assert {"VirtualService", "DestinationRule", "Gateway", "ServiceEntry", "Service"} <= kinds
