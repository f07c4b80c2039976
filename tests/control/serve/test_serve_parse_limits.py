"""Hostile config bodies (YAML bombs, deep nesting) get a 400 with a position; nothing else changes."""

from __future__ import annotations

import asyncio
import itertools
import sys
from pathlib import Path

from diktyo.control.server import ControlPlane
from diktyo.testing.controlplane import JSON, YAML, admin_session

GOOD = (
    "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: hello}\n"
    "spec:\n  hosts: [hello]\n  http:\n  - route:\n    - destination: {host: hello}\n"
)
HEAD = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: bomb}\nspec:\n"


def billion_laughs() -> str:
    lines = ['  a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    names = "abcdefghi"
    for prev, cur in itertools.pairwise(names):
        lines.append(f"  {cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    return HEAD + "\n".join(lines) + "\n"


async def test_bomb_and_deep_yaml_get_400_and_the_last_good_config_keeps_serving() -> None:
    cp = ControlPlane(observability=False)
    await cp.start()
    try:
        async with admin_session(cp) as s:
            async with s.post(cp.url + "/v1/config?source=good.yaml", data=GOOD, headers=YAML) as r:
                assert r.status == 200
            generation = cp.store.generation
            bodies = {
                "bomb.yaml": (billion_laughs(), "bomb.yaml:10:", "max_alias_nodes"),
                "deep.yaml": (
                    HEAD + "  hosts: " + "[" * 3000 + "]" * 3000,
                    "deep.yaml:5:",
                    "max_depth",
                ),
            }
            for name, (body, where, limit) in bodies.items():
                post = asyncio.ensure_future(
                    s.post(cp.url + f"/v1/config?source={name}", data=body, headers=YAML)
                )
                # the control plane keeps answering while it refuses the body
                async with s.get(cp.url + "/healthz") as h:
                    assert h.status == 200
                async with await post as r:
                    answer = await r.json()
                    assert r.status == 400, answer
                [err] = answer["errors"]
                assert err.startswith(where) and limit in err, err
            assert cp.store.generation == generation
            assert [r.name for r in cp.store.resources] == ["hello"]
    finally:
        await cp.stop()


async def test_deeply_nested_json_bodies_get_400_not_500() -> None:
    cp = ControlPlane(observability=False)
    await cp.start()
    deep = b'{"name": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"
    try:
        async with admin_session(cp) as s:
            for path in (
                "/v1/registry/instances",
                "/v1/registry/services",
                "/v1/registry/proxies",
                "/v1/ack",
                "/v1/certificates",
            ):
                async with s.post(cp.url + path, data=deep, headers=JSON) as r:
                    body = await r.json()
                    assert r.status == 400, (path, body)
                    assert "max_depth" in str(body), (path, body)
    finally:
        await cp.stop()


async def test_sidecar_config_dir_with_a_bomb_exits_with_the_position(tmp_path: Path) -> None:
    (tmp_path / "bomb.yaml").write_text(billion_laughs())
    deep = HEAD.replace("bomb", "deep") + "  hosts: " + "[" * 2000 + "]" * 2000 + "\n"
    (tmp_path / "deep.yaml").write_text(deep)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "diktyo.cli.main", "sidecar", "--config", str(tmp_path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    text = err.decode()
    assert proc.returncode == 1, text
    assert f"{tmp_path / 'bomb.yaml'}:10:" in text and "max_alias_nodes" in text
    assert f"{tmp_path / 'deep.yaml'}:5:" in text and "max_depth" in text
    assert "RecursionError" not in text and "Traceback" not in text
