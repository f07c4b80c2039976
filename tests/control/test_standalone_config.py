"""snapshot_from_dir: a folder of Istio YAML -> a valid standalone snapshot, or all errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from diktyo.control.standalone import ConfigLoadError, snapshot_from_dir
from diktyo.snapshot import from_builtins, to_builtins

SAMPLE = Path(__file__).resolve().parents[2] / "samples" / "standalone"


def test_sample_dir_translates_to_a_valid_snapshot() -> None:
    snap = snapshot_from_dir(SAMPLE, outbound_port=15001, node_id="edge")
    assert from_builtins(to_builtins(snap)) == snap
    assert snap.node.mode == "standalone" and snap.node.id == "edge"
    (lst,) = snap.listeners
    assert (lst.direction, lst.port, lst.route_table) == ("outbound", 15001, "outbound")
    (table,) = snap.route_tables
    (vh,) = table.virtual_hosts
    assert "backend.local" in vh.domains and "backend.local:80" in vh.domains
    assert [r.name for r in vh.routes] == ["canary-header", "default"]
    split = vh.routes[1].clusters
    assert [(c.subset, c.weight) for c in split] == [("v1", 90), ("v2", 10)]
    clusters = {c.name: c for c in snap.clusters}
    v2 = clusters["outbound|80|v2|backend.local"]
    assert [(e.address, e.port) for e in v2.endpoints] == [("127.0.0.1", 18082)]
    assert v2.pool.max_connections == 100 and v2.policy_source == "DestinationRule backend"
    assert len(clusters["outbound|80||backend.local"].endpoints) == 2


def test_version_is_a_hash_of_the_input(tmp_path: Path) -> None:
    for f in SAMPLE.glob("*.yaml"):
        (tmp_path / f.name).write_text(f.read_text())
    v1 = snapshot_from_dir(tmp_path).version
    assert snapshot_from_dir(tmp_path).version == v1
    assert snapshot_from_dir(tmp_path, version="7").version == "7"
    f = next(tmp_path.glob("*.yaml"))
    f.write_text(
        f.read_text().replace("weight: 90", "weight: 80").replace("weight: 10", "weight: 20")
    )
    assert snapshot_from_dir(tmp_path).version != v1


def test_errors_are_all_listed(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: a}\n"
        "spec:\n  hosts: [x]\n  htp: []\n---\n"
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: b}\n"
        "spec: {}\n"
    )
    with pytest.raises(ConfigLoadError) as info:
        snapshot_from_dir(tmp_path)
    text = str(info.value)
    assert f"{tmp_path / 'bad.yaml'}:6:3: error: spec.htp: unknown field 'htp'" in text
    assert "missing required field 'host'" in text
    assert len(info.value.errors) == 2


def test_missing_dir() -> None:
    with pytest.raises(ConfigLoadError, match="does not exist"):
        snapshot_from_dir("/nonexistent/diktyo-config")
