"""``match.port`` through a real sidecar: a request whose authority has no port is addressed
to the scheme's default port, as in Istio (it used to get 404 NR)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

from diktyo.testing import FakeUpstream, Response, http_request

CONFIG = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: googleapis}}
spec:
  hosts: [www.googleapis.com]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports:
  - {{number: 80, name: http, protocol: HTTP}}
  - {{number: 8080, name: http-alt, protocol: HTTP}}
  endpoints:
  - {{address: 127.0.0.1, ports: {{http: {up80}, http-alt: {up8080}}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: googleapis}}
spec:
  hosts: [www.googleapis.com]
  http:
  - match:
    - port: 80
    route:
    - destination: {{host: www.googleapis.com, port: {{number: 80}}}}
  - match:
    - port: 8080
    route:
    - destination: {{host: www.googleapis.com, port: {{number: 8080}}}}
"""


async def test_port_match_without_port_in_authority(tmp_path: Path) -> None:
    async with (
        FakeUpstream(Response(body=b"via-80")) as up80,
        FakeUpstream(Response(body=b"via-8080")) as up8080,
    ):
        (tmp_path / "g.yaml").write_text(CONFIG.format(up80=up80.port, up8080=up8080.port))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "diktyo.cli.main", "sidecar", "--config", str(tmp_path),
            "--outbound-port", "0", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            ready = json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))
            port = ready["listeners"]["outbound"]
            r = await http_request(port, "GET", "http://www.googleapis.com/x")
            assert (r.status, r.body) == (200, b"via-80")
            r = await http_request(port, "GET", "http://www.googleapis.com:8080/x")
            assert (r.status, r.body) == (200, b"via-8080")
        finally:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 15)


def test_explain_takes_the_same_route(tmp_path: Path) -> None:
    (tmp_path / "g.yaml").write_text(CONFIG.format(up80=1080, up8080=1081))
    explain = subprocess.run(
        [sys.executable, "-m", "diktyo.cli.main", "explain", "--config", str(tmp_path)]
        + ["-o", "json", "GET", "http://www.googleapis.com/x"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert explain.returncode == 0, explain.stdout + explain.stderr
    assert json.loads(explain.stdout)["cluster"] == "outbound|80||www.googleapis.com"
