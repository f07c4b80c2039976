"""Transparent mode end to end (issue 10): apps without any proxy settings call
``http://hello:9080`` / Bookinfo's ``http://reviews:9080`` and the kernel sends the calls through
their sidecars (metrics and access logs prove it); ``diktyo down`` leaves nothing behind."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from diktyo.platform.capture_netns import Netns, capture_unavailable_reason
from diktyo.platform.harness import MeshThread
from diktyo.platform.mesh import load_mesh
from diktyo.testing import eventually_sync

ROOT = Path(__file__).resolve().parents[2]
TINY_APP = Path(__file__).parent / "apps" / "tiny_app.py"
BOOKINFO = ROOT / "samples" / "bookinfo"
NET = BOOKINFO / "networking"

pytestmark = [
    pytest.mark.skipif(
        capture_unavailable_reason() is not None,
        reason=f"transparent mode unavailable: {capture_unavailable_reason()}",
    ),
    pytest.mark.timeout(150),
]
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get(url: str, timeout: float = 10) -> tuple[int, str]:
    try:
        with _opener.open(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _network(tag: str) -> str:
    return (
        f"network: {{cidr: 10.{100 + secrets.randbelow(100)}.0.0/16, "
        f"namePrefix: dke{tag}-, linkPrefix: e{tag}}}\n"
    )


def _diktyo(
    *args: str, env: dict[str, str], timeout: float = 90
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "diktyo.cli.main", *args],
        env=env, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def _in_ns(ns: str, *argv: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    return subprocess.run(
        ["ip", "netns", "exec", ns, *argv],
        env=clean, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


@pytest.mark.skipif(
    shutil.which("curl") is None, reason="needs curl (Debian: apt-get install curl)"
)
def test_curl_without_proxy_settings_goes_through_the_mesh(tmp_path: Path) -> None:
    tag = secrets.token_hex(2)
    (tmp_path / "mesh.yaml").write_text(
        f"name: tp{tag}\n" + _network(tag) + "accessLog: {enabled: true}\n"
        "services:\n"
        "  - name: hello\n    ports: [{name: http, port: 9080}]\n"
        "  - name: front\n    ports: [{name: http, port: 9080}]\n"
        "workloads:\n"
        f'  - name: hello-v1\n    labels: {{app: hello, version: v1}}\n    command: ["{{python}}", "{TINY_APP}"]\n'
        f'  - name: front-v1\n    labels: {{app: front, version: v1}}\n    command: ["{{python}}", "{TINY_APP}"]\n'
    )
    env = {**os.environ, "DIKTYO_HOME": str(tmp_path / "home"), "NO_PROXY": "*"}
    netns = Netns(prefix=f"dke{tag}-", link_prefix=f"e{tag}")
    up = _diktyo(
        "up", "-f", str(tmp_path / "mesh.yaml"), "--capture", "transparent", "--detach",
        "--timeout", "60", env=env,
    )  # fmt: skip
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert "capture:       transparent, network 10." in up.stdout, up.stdout
        state = json.loads(_diktyo("status", "-o", "json", env=env).stdout)
        assert state["capture"] == "transparent"
        rows = {w["name"]: w for w in state["workloads"]}
        front, hello = rows["front-v1-1"], rows["hello-v1-1"]
        assert front["capture"] == hello["capture"] == "transparent"
        assert front["address"] != hello["address"]
        table = _diktyo("status", env=env).stdout
        assert "ADDRESS" in table and hello["address"] in table and "transparent" in table

        # curl in front's namespace, no proxy variables, the service's plain name
        for url in ("http://hello:9080/", "http://hello.default.svc.cluster.local:9080/"):
            out = _in_ns(front["netns"], "curl", "-sS", "-m", "10", url)
            assert out.returncode == 0, out.stderr
            assert json.loads(out.stdout)["pod"] == "hello-v1-1"

        # the source sidecar reported it (admin port on the pod address, reached from here)
        code, metrics = _get(f"http://{front['address']}:15000/stats/prometheus")
        assert code == 200
        source = [
            ln for ln in metrics.splitlines()
            if ln.startswith("istio_requests_total{") and 'reporter="source"' in ln
            and 'destination_service="hello.default.svc.cluster.local"' in ln
        ]  # fmt: skip
        assert source and float(source[0].rsplit(" ", 1)[1]) >= 2, metrics[-2000:]
        code, metrics = _get(f"http://{hello['address']}:15000/stats/prometheus")
        dest = [
            ln for ln in metrics.splitlines()
            if ln.startswith("istio_requests_total{") and 'reporter="destination"' in ln
            and 'source_workload="front-v1"' in ln
        ]  # fmt: skip
        assert dest and 'connection_security_policy="mutual_tls"' in dest[0], metrics[-2000:]
        # and logged it (Istio's text access log on the sidecar's stdout)
        log = tmp_path / "home" / "logs" / "hello-v1-1-sidecar.log"
        eventually_sync(
            lambda: "GET / HTTP/1.1" in (log.read_text() if log.exists() else ""),
            timeout=10,
            what=lambda: f"an access log line in {log}: {list(log.parent.iterdir())}",
        )

        # diktyo load --via front runs inside front's namespace, like fortio in its pod
        load = _diktyo(
            "load", "--via", "front-v1", "-c", "1", "-n", "5", "-o", "json",
            "http://hello:9080/", env=env,
        )  # fmt: skip
        assert load.returncode == 0, load.stdout + load.stderr
        report = json.loads(load.stdout)
        assert report["codes"] == {"200": 5} and report["proxy"] in (None, ""), report

        # the CLI's views of a captured sidecar: explain (the real matcher on its snapshot:
        # virtualOutbound routes HTTP on the "outbound" table) and proxy-config
        explain = _diktyo("explain", "--from", "front-v1", "GET", "http://hello:9080/", env=env)
        assert explain.returncode == 0, explain.stdout + explain.stderr
        assert "listener virtualOutbound -> route table outbound" in explain.stdout, explain.stdout
        assert "destination hello.default.svc.cluster.local" in explain.stdout, explain.stdout
        assert "matched the default route of the service" in explain.stdout, explain.stdout
        routes = _diktyo("proxy-config", "front-v1-1", "routes", env=env)
        assert "hello.default.svc.cluster.local:9080" in routes.stdout, routes.stdout + routes.stderr

        # an address outside the mesh has no route: nothing leaves the machine
        out = _in_ns(front["netns"], "curl", "-sS", "-m", "5", "http://192.0.2.10/")
        assert out.returncode != 0
    finally:
        down = _diktyo("down", env=env)
        assert down.returncode == 0, down.stdout + down.stderr
    assert netns.leftovers() == {"namespaces": [], "links": [], "hosts": []}


SERVED_BY = re.compile(r"Reviews served by:\s*(?:<[^>]*>)?\s*([a-z0-9-]+)")


def test_bookinfo_without_proxy_settings() -> None:
    tag = secrets.token_hex(2)
    text = (BOOKINFO / "mesh.yaml").read_text() + "\ncapture: transparent\n" + _network(tag)
    spec_file = Path(f"/tmp/dke{tag}-bookinfo.yaml")
    spec_file.write_text(text)
    netns = Netns(prefix=f"dke{tag}-", link_prefix=f"e{tag}")
    try:
        spec = load_mesh(spec_file).model_copy(update={"base_dir": str(BOOKINFO)})
        with MeshThread(spec, gateway_host_port=0, start_timeout=120) as mesh:
            for name in ("bookinfo-gateway.yaml", "destination-rule-all.yaml"):
                mesh.apply_file(NET / name)
            mesh.apply_file(NET / "virtual-service-reviews-v3.yaml")
            mesh.wait_synced()
            lm = mesh.mesh
            assert lm is not None
            for rep in lm.replicas:
                if rep.app is not None:
                    env = Path(f"/proc/{rep.app.pid}/environ").read_bytes()
                    assert b"HTTP_PROXY=" not in env and b"http_proxy=" not in env
            seen: list[str] = []

            def served_page() -> tuple[int, str] | None:
                code, body = _get(mesh.gateway_url + "/productpage")
                seen[:] = [f"{code}: {body[-800:]}"]
                return (code, body) if code == 200 and "Reviews served by" in body else None

            code, body = eventually_sync(
                served_page, timeout=30, interval=0.5, what=lambda: f"a product page: {seen}"
            )
            # productpage -> details, reviews (v3 by the VirtualService) -> ratings (red stars)
            served = SERVED_BY.search(body)
            assert served is not None and served.group(1).startswith("reviews-v3"), body[-800:]
            assert '<font color="red">' in body and "★" in body, body[-800:]
            assert "Sorry, product details are currently unavailable" not in body
            assert "Error fetching product reviews" not in body
    finally:
        spec_file.unlink(missing_ok=True)
    assert netns.leftovers() == {"namespaces": [], "links": [], "hosts": []}


def test_killed_supervisor_is_replaced_and_down_leaves_nothing(tmp_path: Path) -> None:
    """kill -9 of the supervisor: its keeper starts a new one, which stops the orphaned
    replicas, removes their network and makes it anew (namespaces are not adopted)."""
    tag = secrets.token_hex(2)
    (tmp_path / "mesh.yaml").write_text(
        f"name: tk{tag}\ncapture: transparent\n" + _network(tag) + "services:\n"
        "  - name: hello\n    ports: [{name: http, port: 9080}]\n"
        "workloads:\n"
        f'  - name: hello-v1\n    labels: {{app: hello, version: v1}}\n    command: ["{{python}}", "{TINY_APP}"]\n'
    )
    env = {**os.environ, "DIKTYO_HOME": str(tmp_path / "home"), "NO_PROXY": "*"}
    netns = Netns(prefix=f"dke{tag}-", link_prefix=f"e{tag}")
    up = _diktyo("up", "-f", str(tmp_path / "mesh.yaml"), "--detach", "--timeout", "60", env=env)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        first = json.loads(_diktyo("status", "-o", "json", env=env).stdout)
        old_app = first["workloads"][0]["app_pid"]
        os.kill(int(first["pid"]), 9)

        def replaced() -> dict | None:
            st = json.loads(_diktyo("status", "-o", "json", env=env).stdout)
            ok = st.get("running") and st["pid"] != first["pid"] and st.get("state") == "ready"
            return st if ok else None

        st = eventually_sync(replaced, timeout=60, interval=0.5, what="a new supervisor ready")
        hello = st["workloads"][0]
        assert hello["app_pid"] != old_app  # started anew, in a namespace made anew
        assert netns.namespaces() == [hello["netns"]]
        code = (
            "import json, urllib.request; o = urllib.request.build_opener("
            "urllib.request.ProxyHandler({})); "
            "print(o.open('http://hello:9080/', timeout=10).read().decode())"
        )
        out = _in_ns(hello["netns"], sys.executable, "-c", code)
        assert out.returncode == 0 and json.loads(out.stdout)["pod"] == "hello-v1-1", out.stderr
        log = (tmp_path / "home" / "mesh.log").read_text()
        assert "stopping it and starting it anew" in log and "removed the mesh's network" in log
    finally:
        down = _diktyo("down", env=env)
        assert down.returncode == 0, down.stdout + down.stderr
    assert netns.leftovers() == {"namespaces": [], "links": [], "hosts": []}
