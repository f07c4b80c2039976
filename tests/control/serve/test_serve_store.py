"""ConfigStore with the real Istio loader: folder + applied overlay, rejected changes keep the last good config."""

from __future__ import annotations

from pathlib import Path

from diktyo.control.store import ConfigStore

VS = """apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: {name}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {{host: reviews, subset: v1}}
"""

BAD = """apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: broken
spec:
  hosts: [reviews]
  htp: []
"""


def names(store: ConfigStore) -> list[str]:
    return sorted(k[2] for k in store.resource_keys())


def test_folder_apply_delete_and_rejections(tmp_path: Path) -> None:
    changes: list[int] = []
    (tmp_path / "a.yaml").write_text(VS.format(name="from-file"))
    store = ConfigStore(tmp_path, on_change=lambda: changes.append(1))
    assert store.reload_files() and names(store) == ["from-file"]
    assert not store.reload_files()  # nothing changed on disk

    keys, errors = store.apply_text(VS.format(name="applied"), "x.yaml")
    assert errors == () and keys == [("VirtualService", "default", "applied")]
    assert names(store) == ["applied", "from-file"]

    keys, errors = store.apply_text(BAD, "bad.yaml")
    assert keys == [] and len(errors) == 1
    assert errors[0].startswith("bad.yaml:7:3: error: spec.htp: unknown field 'htp'")
    assert names(store) == ["applied", "from-file"]

    (tmp_path / "b.yaml").write_text(BAD)
    assert not store.reload_files()
    assert store.errors and str(tmp_path / "b.yaml") in store.errors[0]
    assert names(store) == ["applied", "from-file"]  # last good config kept

    (tmp_path / "b.yaml").unlink()
    assert store.reload_files() and store.errors == ()

    deleted, problems = store.delete_text(VS.format(name="from-file"))
    assert deleted == [] and "remove it from that file" in problems[0]
    deleted, problems = store.delete_text(VS.format(name="applied"))
    assert deleted == [("VirtualService", "default", "applied")] and problems == ()
    assert names(store) == ["from-file"]
    assert len(changes) == 4  # load, apply, reload after the fix, delete
