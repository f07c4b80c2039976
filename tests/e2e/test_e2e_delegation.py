"""VirtualService delegation through a real sidecar: a root VirtualService hands /api to a
delegate in another namespace; requests take the merged routes, ``diktyo explain`` names the
delegate."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from diktyo.testing import FakeUpstream, Response, http_request

pytestmark = pytest.mark.timeout(120)

CONFIG = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: shop, namespace: default}}
spec:
  hosts: [shop.example.com]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{http: {web}}}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: api, namespace: team-a}}
spec:
  hosts: [api.team-a.svc.cluster.local]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
  - {{address: 127.0.0.1, ports: {{http: {v1}}}, labels: {{version: v1}}}}
  - {{address: 127.0.0.1, ports: {{http: {v2}}}, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: api, namespace: team-a}}
spec:
  host: api
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: shop, namespace: default}}
spec:
  hosts: [shop.example.com]
  http:
  - name: api
    match:
    - uri: {{prefix: /api}}
      headers: {{x-team: {{exact: a}}}}
    headers:
      request:
        set: {{x-via: root}}
    delegate: {{name: api, namespace: team-a}}
  - name: web
    route:
    - destination: {{host: shop.example.com}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: api, namespace: team-a}}
spec:
  http:
  - name: v2
    match:
    - uri: {{prefix: /api/v2}}
    route:
    - destination: {{host: api, subset: v2}}
  - name: teapot
    match:
    - uri: {{prefix: /teapot}}
    directResponse: {{status: 418}}
  - name: v1
    route:
    - destination: {{host: api, subset: v1}}
"""


def _explain(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "diktyo.cli.main", "explain", "--config", str(config), *args],
        check=False, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


async def test_delegated_routes_through_a_sidecar(tmp_path: Path) -> None:
    async with (
        FakeUpstream(Response(body=b"web")) as web,
        FakeUpstream(Response(body=b"api-v1")) as v1,
        FakeUpstream(Response(body=b"api-v2")) as v2,
    ):
        (tmp_path / "mesh.yaml").write_text(CONFIG.format(web=web.port, v1=v1.port, v2=v2.port))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "diktyo.cli.main", "sidecar", "--config", str(tmp_path),
            "--outbound-port", "0",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            assert line, (await proc.stderr.read()).decode()  # type: ignore[union-attr]
            port = json.loads(line)["listeners"]["outbound"]
            team = {"x-team": "a"}
            url = "http://shop.example.com"
            r = await http_request(port, "GET", f"{url}/api/v2/items", team)
            assert (r.status, r.body) == (200, b"api-v2")
            # delegate routes inherit the root route's header operations
            assert v2.requests[-1].headers["x-via"] == "root"
            r = await http_request(port, "GET", f"{url}/api/other", team)
            assert (r.status, r.body) == (200, b"api-v1")
            # the root match (x-team: a) is merged into every delegate route
            r = await http_request(port, "GET", f"{url}/api/v2/items")
            assert (r.status, r.body) == (200, b"web")
            assert "x-via" not in web.requests[-1].headers
            # /teapot is outside the root's /api prefix: that delegate route never applies
            r = await http_request(port, "GET", f"{url}/teapot", team)
            assert (r.status, r.body) == (200, b"web")
        finally:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 15)

    res = _explain(tmp_path, "GET", "http://shop.example.com/api/v2/x", "-H", "x-team: a")
    assert res.returncode == 0, res.stderr
    assert "of VirtualService default/shop" in res.stdout
    assert "via delegate team-a/api rule 0 at " in res.stdout
    res = _explain(
        tmp_path, "-o", "json", "GET", "http://shop.example.com/api/x", "-H", "x-team: a"
    )
    out = json.loads(res.stdout)
    assert out["delegate"] == "team-a/api"
    assert out["rule"]["name"] == "api-v1" and out["rule"]["delegate"]["index"] == 2
    assert out["destination"] == {
        "host": "api.team-a.svc.cluster.local", "subset": "v1", "port": 80
    }  # fmt: skip
