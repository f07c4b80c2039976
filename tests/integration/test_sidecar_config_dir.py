"""`diktyo sidecar --config DIR` and `diktyo explain` on a directory of Istio YAML."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

from diktyo.testing import FakeUpstream, Response, http_request, reviews_by_user


async def test_sidecar_from_config_dir_routes_by_header(tmp_path: Path) -> None:
    async with FakeUpstream(Response(body=b"v1")) as v1, FakeUpstream(Response(body=b"v2")) as v2:
        (tmp_path / "mesh.yaml").write_text(reviews_by_user(v1.port, v2.port))
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "diktyo.cli.main",
            "sidecar",
            "--config",
            str(tmp_path),
            "--outbound-port",
            "0",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            assert proc.stdout is not None
            ready = json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))
            port = ready["listeners"]["outbound"]
            r = await http_request(port, "GET", "http://reviews:9080/r")
            assert r.body == b"v1"
            r = await http_request(port, "GET", "http://reviews:9080/r", {"end-user": "jason"})
            assert r.body == b"v2"
        finally:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 15)


def test_explain_cli_json(tmp_path: Path) -> None:
    (tmp_path / "mesh.yaml").write_text(reviews_by_user(19081, 19082))
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "diktyo.cli.main",
            "explain",
            "--config",
            str(tmp_path),
            "GET",
            "http://reviews:9080/x",
            "-H",
            "end-user: jason",
            "-o",
            "json",
        ],
        check=False,
        capture_output=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["virtualService"] == "default/reviews"
    assert out["rule"]["name"] == "jason"
    assert out["destination"]["subset"] == "v2" and out["destination"]["port"] == 9080
    for key in ("timeout", "retries", "fault", "mirror"):
        assert key in out
