"""``diktyo apply`` rejects config whose analysis finds errors (issue 12, item 14); warnings pass."""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

import pytest

from diktyo.control.server import ControlPlane
from diktyo.testing.controlplane import YAML, admin_session, cli_env

DR = (
    "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: reviews}\n"
    "spec:\n  host: reviews\n  subsets:\n  - {name: v1, labels: {version: v1}}\n"
)


def vs(
    hosts: str = "[reviews]", dest: str = "{host: reviews, subset: v1}", weight: int = 100
) -> str:
    return (
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews}\n"
        f"spec:\n  hosts: {hosts}\n  http:\n  - route:\n    - destination: {dest}\n"
        f"      weight: {weight}\n"
    )


async def _cli(cp: ControlPlane, *args: str) -> tuple[int, str, str]:
    home = tempfile.mkdtemp(prefix="diktyo-home-")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "diktyo.cli.main", *args, "--control-plane", cp.url,
        env=cli_env(cp, home),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


CASES = {
    "weight-150": (vs(weight=150), "weight.yaml:9:", "weight 150"),
    "unknown-subset": (vs(dest="{host: reviews, subset: v9}"), "subset.yaml:8:", '"reviews+v9"'),
    "wildcard-host": (vs(hosts="['*']"), "star.yaml:5:", "wildcard host *"),
    "unicode-host": (vs(hosts="['rev\u0456ews']"), "unicode.yaml:5:", "non-ASCII"),
    "deep-nesting": (vs(hosts="[" * 500 + "]" * 500), "deep.yaml:5:", "max_depth=100"),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_apply_with_errors_exits_1_and_keeps_the_old_config(
    case: str, tmp_path: Path
) -> None:
    text, where, what = CASES[case]
    name = where.split(":")[0]
    cp = ControlPlane(observability=False)
    await cp.start()
    try:
        (tmp_path / "dr.yaml").write_text(DR)
        (tmp_path / "vs.yaml").write_text(vs())
        rc, out, err = await _cli(cp, "apply", "-f", str(tmp_path))
        assert rc == 0, err
        good = {(r.kind, r.name): r.spec for r in cp.store.resources}
        generation = cp.store.generation
        bad = tmp_path / "bad"
        bad.mkdir()
        (bad / name).write_text(text)
        rc, out, err = await _cli(cp, "apply", "-f", str(bad / name))
        assert rc == 1, (out, err)
        assert any(
            str(bad / where) in line and what in line for line in err.splitlines()
        ), err
        assert "nothing applied" in err and "applied" not in out
        assert cp.store.generation == generation
        assert {(r.kind, r.name): r.spec for r in cp.store.resources} == good
        # a raw POST cannot bypass the CLI's check: the control plane itself refuses
        async with (
            admin_session(cp) as s,
            s.post(cp.url + f"/v1/config?source={name}", data=text.encode(), headers=YAML) as r,
        ):
            body = await r.json()
            assert r.status == 400 and body["applied"] == [], body
        assert cp.store.generation == generation
    finally:
        await cp.stop()


async def test_files_applied_together_and_warnings_pass(tmp_path: Path) -> None:
    cp = ControlPlane(observability=False)
    await cp.start()
    try:
        # the VirtualService's subset is defined in a file that sorts after it: one request
        (tmp_path / "a-vs.yaml").write_text(vs())
        (tmp_path / "b-dr.yaml").write_text(DR)
        rc, out, err = await _cli(cp, "apply", "-f", str(tmp_path))
        assert rc == 0, err
        assert "virtualservice/reviews (default) applied" in out
        assert "destinationrule/reviews (default) applied" in out
        # a warning (a destination host the registry does not know) is printed and passes
        cp.registry.add_service(_service("reviews"))
        warn = tmp_path / "warn.yaml"
        other = vs(hosts="[other]", dest="{host: nowhere}").replace("name: reviews", "name: other")
        warn.write_text(other)
        rc, out, err = await _cli(cp, "apply", "-f", str(warn))
        assert rc == 0, err
        # reported (Istio's analyzer calls it an error) but not rejected: the host may register
        assert f"{warn}:8:" in err and 'Referenced host not found: "nowhere"' in err
        assert "virtualservice/other (default) applied" in out
    finally:
        await cp.stop()


def _service(name: str):  # type: ignore[no-untyped-def]
    from diktyo.control.model import Service, ServicePort

    return Service(
        hostname=f"{name}.default.svc.cluster.local", short_name=name, ports=(ServicePort(9080),)
    )
