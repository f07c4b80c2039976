"""`diktyo control-plane` reads the Helm chart's DIKTYO_TRUST_DOMAIN and DIKTYO_LOG_LEVEL
(flags win; a bad value exits 2 naming the variable), as a real process."""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
from pathlib import Path

import aiohttp
import pytest

from diktyo.cli.control_plane import register, settings


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    register(p.add_subparsers())
    return p.parse_args(["control-plane", *argv])


def test_flags_over_environment_over_defaults() -> None:
    env = {"DIKTYO_TRUST_DOMAIN": "Corp.Example", "DIKTYO_LOG_LEVEL": "warn"}
    assert settings(_args(), {}) == ("cluster.local", "warning")
    assert settings(_args(), env) == ("corp.example", "warning")  # Istio's "warn"
    assert settings(_args(), {**env, "DIKTYO_LOG_LEVEL": "trace"}) == ("corp.example", "debug")
    got = settings(_args("--trust-domain", "mesh.test", "--log-level", "error"), env)
    assert got == ("mesh.test", "error")
    assert settings(_args(), {"DIKTYO_TRUST_DOMAIN": "", "DIKTYO_LOG_LEVEL": " "}) == (
        "cluster.local", "warning")  # an empty chart value is the default
    with pytest.raises(ValueError, match=r"--log-level 'loud': expected one of debug"):
        settings(_args("--log-level", "loud"), env)  # the flag is named, not the variable


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: os.environ[k] for k in ("PATH", "PYTHONPATH", "LANG") if k in os.environ}
    return {**env, "HOME": str(tmp_path), "DIKTYO_HOME": str(tmp_path / "home"), **extra}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"DIKTYO_TRUST_DOMAIN": "Not A Domain"},
         "DIKTYO_TRUST_DOMAIN='Not A Domain': expected a DNS-like trust domain"),
        ({"DIKTYO_LOG_LEVEL": "loud"},
         "DIKTYO_LOG_LEVEL='loud': expected one of debug, info, warning, error"),
    ],
)
async def test_bad_chart_environment_exits_2(tmp_path: Path, extra: dict[str, str], message: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "diktyo.cli.main", "control-plane", "--port", "0",
        env=_env(tmp_path, **extra), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 2 and b"serving" not in out
    assert message in err.decode(), err


@pytest.mark.parametrize(
    ("flags", "domain", "info_logged"),
    [([], "corp.example", True),
     (["--trust-domain", "flag.example", "--log-level", "warning"], "flag.example", False)],
)
async def test_chart_environment_is_used(tmp_path: Path, flags: list[str], domain: str,
                                         info_logged: bool) -> None:
    """The chart's trustDomain names the identities the CA signs and its logLevel decides what
    is logged, unless the flags say otherwise."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "diktyo.cli.main", "control-plane", "--port", "0", *flags,
        env=_env(tmp_path, DIKTYO_TRUST_DOMAIN="corp.example", DIKTYO_LOG_LEVEL="info"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        url = re.search(r"serving on (http://\S+?)[,\s]", line)
        assert url, line
        admin = (tmp_path / "home" / "admin-token").read_text().strip()
        async with (aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin}"}) as s,
                    s.post(url.group(1) + "/v1/tokens",
                           json={"namespace": "shop", "service_account": "web"}) as r):
            assert r.status == 200
            assert (await r.json())["spiffe_id"] == f"spiffe://{domain}/ns/shop/sa/web"
    finally:
        proc.terminate()
        _, err = await asyncio.wait_for(proc.communicate(), 20)
    logged = "INFO diktyo.control.server: control plane serving" in err.decode()
    assert logged is info_logged, err.decode()[-2000:]
