"""Istio's own Bookinfo networking samples load unchanged with zero errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from diktyo.api import load_paths

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"
BOOKINFO = SHARED / "istio" / "bookinfo"
FILES = sorted(BOOKINFO.glob("*.yaml")) if BOOKINFO.is_dir() else []


@pytest.mark.skipif(not BOOKINFO.is_dir(), reason=f"{BOOKINFO} missing (shared/ beside the repo)")
@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_istio_bookinfo_file_loads_without_errors(path: Path) -> None:
    result = load_paths([path])
    assert [str(e) for e in result.errors] == []
    assert result.resources, f"{path.name}: no resources loaded"
    for res in result.resources:
        assert res.file == str(path)
        assert res.line >= 1 and res.positions["kind"][0] >= res.line


@pytest.mark.skipif(not BOOKINFO.is_dir(), reason=f"{BOOKINFO} missing (shared/ beside the repo)")
def test_istio_bookinfo_dir_has_every_expected_kind() -> None:
    result = load_paths([BOOKINFO])
    assert result.errors == []
    kinds = {r.kind for r in result.resources}
    assert {"VirtualService", "DestinationRule", "Gateway"} <= kinds
    names = {(r.kind, r.name) for r in result.resources}
    assert ("VirtualService", "reviews") in names and ("DestinationRule", "ratings") in names


SAMPLES = Path(__file__).resolve().parents[2] / "samples" / "bookinfo" / "networking"


@pytest.mark.parametrize("path", sorted(SAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_diktyo_bookinfo_samples_load_without_errors(path: Path) -> None:
    result = load_paths([path])
    assert [str(e) for e in result.errors] == []
    assert result.resources


TASKS = [
    ["virtual-service-all-v1.yaml"],
    ["virtual-service-reviews-test-v2.yaml"],
    ["virtual-service-ratings-test-delay.yaml"],
    ["virtual-service-ratings-test-abort.yaml"],
    ["virtual-service-reviews-50-v3.yaml"],
    ["virtual-service-reviews-v3.yaml"],
    ["virtual-service-ratings-delay-2s.yaml", "virtual-service-reviews-timeout.yaml"],
    ["bookinfo-gateway.yaml"],
]


@pytest.mark.parametrize("files", TASKS, ids=lambda f: "+".join(f))
def test_each_bookinfo_task_analyzes_clean(files: list[str]) -> None:
    from diktyo.control.validate import BOOKINFO_HOSTS, analyze, registry_for_hosts

    result = load_paths([SAMPLES / f for f in [*files, "destination-rule-all.yaml"]])
    assert result.errors == []
    problems = analyze(result.resources, registry_for_hosts(BOOKINFO_HOSTS))
    assert [str(p) for p in problems] == []


def test_circuit_breaker_rule_alone_is_clean() -> None:
    from diktyo.control.validate import BOOKINFO_HOSTS, analyze, registry_for_hosts

    result = load_paths([SAMPLES / "destination-rule-reviews-cb.yaml"])
    assert analyze(result.resources, registry_for_hosts(BOOKINFO_HOSTS)) == []
