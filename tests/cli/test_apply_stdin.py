"""``diktyo apply -f -`` reads YAML from standard input (like ``kubectl apply -f -``)."""

from __future__ import annotations

import asyncio
import sys
import tempfile

from diktyo.control.server import ControlPlane
from diktyo.testing.controlplane import cli_env

VS = (
    "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: hello}\n"
    "spec:\n  hosts: [hello]\n  http:\n  - route:\n    - destination: {host: hello}\n"
)


async def _cli(cp: ControlPlane, *args: str, stdin: str) -> tuple[int, str, str]:
    home = tempfile.mkdtemp(prefix="diktyo-home-")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "diktyo.cli.main", *args, "--control-plane", cp.url,
        env=cli_env(cp, home), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(stdin.encode()), 30)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_apply_and_delete_from_stdin() -> None:
    cp = ControlPlane(observability=False)
    await cp.start()
    try:
        rc, out, err = await _cli(cp, "apply", "-f", "-", stdin=VS)
        assert rc == 0, err
        assert "virtualservice/hello (default) applied" in out
        assert [r.name for r in cp.store.resources if r.kind == "VirtualService"] == ["hello"]
        rc, out, err = await _cli(cp, "apply", "-f", "-", stdin=VS.replace("hosts:", "hostz:"))
        assert rc == 1
        assert "<stdin>:5:3" in err and "rejected" in err
        assert [r.name for r in cp.store.resources if r.kind == "VirtualService"] == ["hello"]
        rc, out, err = await _cli(cp, "delete", "-f", "-", stdin=VS)
        assert rc == 0, err
        assert [r for r in cp.store.resources if r.kind == "VirtualService"] == []
    finally:
        await cp.stop()
