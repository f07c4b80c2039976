"""The task meshes users run from ``docs/tasks.md`` live under ``samples/`` and load."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from diktyo.api import load_paths
from diktyo.platform.mesh import load_mesh

REPO = Path(__file__).resolve().parents[2]
TASKS = ["circuit-breaking", "mirroring", "grpc"]


@pytest.mark.parametrize("task", TASKS)
def test_task_mesh_and_its_istio_yaml_load(task: str) -> None:
    folder = REPO / "samples" / task
    mesh = load_mesh(folder / "mesh.yaml")
    assert {w.name for w in mesh.workloads} >= {"sleep"}
    istio = [p for p in sorted(folder.glob("*.yaml")) if p.name != "mesh.yaml"]
    assert istio, f"{folder}: no Istio YAML beside the mesh"
    result = load_paths(istio)
    assert [str(e) for e in result.errors] == [] and result.resources


def test_every_samples_path_in_tasks_doc_exists() -> None:
    text = (REPO / "docs" / "tasks.md").read_text()
    # repository paths only: Istio's own samples are named as ../shared/istio/samples/...
    paths = set(re.findall(r"(?<![\w/])samples/[\w./-]+[\w/]", text))
    assert any("circuit-breaking" in p for p in paths) and any("mirroring" in p for p in paths)
    missing = sorted(p for p in paths if not (REPO / p).exists())
    assert missing == []
    assert "tests/e2e/circuit-breaking" not in text and "tests/e2e/mirroring" not in text
