"""One suite, both store backends: apply, delete and their errors behave the same."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from diktyo.control.backend import EmbeddedBackend
from diktyo.control.etcd.backend import EtcdBackend
from diktyo.control.etcd.gateway import EtcdError
from diktyo.control.server import ControlPlane
from diktyo.testing.controlplane import YAML, admin_session
from diktyo.testing.etcd import EtcdCluster
from diktyo.testing.wait import eventually


def vs(name: str) -> str:
    return f"""apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: {name}}}
spec:
  hosts: [{name}]
  http:
  - route:
    - destination: {{host: {name}}}
"""


@pytest.fixture(params=["embedded", "etcd"])
async def cp(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "f.yaml").write_text(vs("from-file"))
    backend: Any = EmbeddedBackend()
    if request.param == "etcd":
        etcd = request.getfixturevalue("etcd1")
        backend = EtcdBackend(etcd.client_urls, key_file=tmp_path / "k", replica_id="r0")
    plane = ControlPlane(
        observability=False, debounce=0.01, backend=backend, config_dir=tmp_path / "files"
    )
    await plane.start()
    yield plane
    await plane.stop()


async def _call(cp: ControlPlane, method: str, path: str, text: str = "") -> tuple[int, Any]:
    async with (
        admin_session(cp) as s,
        s.request(method, cp.url + path, data=text, headers=YAML) as r,
    ):
        return r.status, await r.json()


async def test_apply_then_delete(cp: ControlPlane) -> None:
    status, body = await _call(cp, "POST", "/v1/config", vs("a") + "---\n" + vs("b"))
    assert status == 200 and sorted(k[2] for k in body["applied"]) == ["a", "b"]
    names = {k[2] for k in cp.store.resource_keys()}
    assert {"a", "b", "from-file"} <= names
    status, body = await _call(cp, "DELETE", "/v1/config", vs("a"))
    assert status == 200 and body["deleted"] == [["VirtualService", "default", "a"]]
    assert "a" not in {k[2] for k in cp.store.resource_keys()}
    status, body = await _call(cp, "DELETE", "/v1/config/VirtualService/default/b")
    assert status == 200
    assert {k[2] for k in cp.store.resource_keys()} == {"from-file"}


async def test_delete_errors(cp: ControlPlane) -> None:
    status, body = await _call(cp, "DELETE", "/v1/config/VirtualService/default/nope")
    assert status == 404 and body["errors"] == ["VirtualService default/nope not found"]
    status, body = await _call(cp, "DELETE", "/v1/config/VirtualService/default/from-file")
    assert status == 404 and "comes from a file" in body["errors"][0]
    assert "from-file" in {k[2] for k in cp.store.resource_keys()}


async def test_rejected_apply_stores_nothing(cp: ControlPlane) -> None:
    status, body = await _call(cp, "POST", "/v1/config", vs("ok") + "---\nkind: [broken\n")
    assert status == 400 and body["applied"] == []
    assert "ok" not in {k[2] for k in cp.store.resource_keys()}


async def test_watch_reloads_after_compaction(replicas, etcd1: EtcdCluster) -> None:
    a, b = await replicas(2)
    await b.backend.commit(*_loaded(vs("kept")))
    await b.backend.commit(*_loaded(vs("gone")))
    await eventually(lambda: ("VirtualService", "default", "gone") in a.backend.config_revisions)
    old = a.backend.revision + 1
    a.backend._tasks[0].cancel()  # a's watch stops; b goes on writing
    await b.backend.delete([("VirtualService", "default", "gone")])
    await b.backend.commit(*_loaded(vs("new")))
    rev = (await b.backend.client.get_prefix("/diktyo/"))[1]
    await b.backend.client.call("kv/compaction", {"revision": str(rev), "physical": True})
    with pytest.raises(EtcdError, match="compacted"):
        async for _ in b.backend.client.watch("/diktyo/", old):
            pass
    a.backend._tasks[0] = asyncio.get_running_loop().create_task(a.backend._watch_loop(old))

    def names() -> set[str]:
        return {k[2] for k in a.store.resource_keys()}

    await eventually(lambda: names() == {"kept", "new"}, timeout=5, what=lambda: str(names()))


def _loaded(text: str) -> tuple[Any, list[tuple[str, str]]]:
    from diktyo.api import load_text

    return load_text(text, "t.yaml").resources, [("t.yaml", text)]
