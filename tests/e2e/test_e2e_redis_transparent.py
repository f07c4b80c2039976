"""A real Redis in the local transparent mesh (`diktyo up`, capture: transparent): `redis-cli`
in the client's network namespace, with no proxy settings, reaches `redis:6379` through both
sidecars under mTLS; STRICT PeerAuthentication, an AuthorizationPolicy on the port, and Istio's
TCP metrics on both sidecars."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from diktyo.platform.capture_netns import Netns, capture_unavailable_reason
from diktyo.testing import eventually_sync

pytestmark = [
    pytest.mark.skipif(
        capture_unavailable_reason() is not None,
        reason=f"transparent mode unavailable: {capture_unavailable_reason()}",
    ),
    pytest.mark.skipif(
        shutil.which("redis-server") is None or shutil.which("redis-cli") is None,
        reason="redis-server / redis-cli not installed (Debian: redis-server)",
    ),
    pytest.mark.timeout(180),
]

REDIS = "redis.default.svc.cluster.local"
POLICIES = """\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: default}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: redis, namespace: default}
spec:
  selector: {matchLabels: {app: redis}}
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/default/sa/client]}}]
    to: [{operation: {ports: ["6379"]}}]
"""
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _diktyo(
    *args: str, env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "diktyo.cli.main", *args], env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)  # fmt: skip


def _in_ns(ns: str, *argv: str, uid: int | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    pre = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"] if uid else []
    return subprocess.run(["ip", "netns", "exec", ns, *pre, *argv], env=clean,
                          capture_output=True, text=True, timeout=30, check=False)  # fmt: skip


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for ln in text.splitlines():
        if ln.startswith(name + "{") and all(f'{k}="{v}"' in ln for k, v in labels.items()):
            total += float(ln.rsplit(" ", 1)[1])
    return total


def _scrape(address: str) -> str:
    with _opener.open(f"http://{address}:15000/stats/prometheus", timeout=10) as r:
        return str(r.read().decode())


def _wait_metric(address: str, name: str, want: float, **labels: str) -> str:
    def reached() -> str | None:
        text = _scrape(address)
        return text if _metric(text, name, **labels) >= want else None

    return eventually_sync(
        reached,
        timeout=20,
        interval=0.2,
        what=lambda: f"{name}{labels} >= {want}:\n{_scrape(address)[-3000:]}",
    )


def test_redis_cli_through_the_transparent_mesh(tmp_path: Path) -> None:
    tag = secrets.token_hex(2)
    (tmp_path / "net").mkdir()
    (tmp_path / "net" / "policies.yaml").write_text(POLICIES)
    sleeper = '["{python}", "-c", "import time; time.sleep(10**9)"]'
    (tmp_path / "mesh.yaml").write_text(
        f"name: rd{tag}\ncapture: transparent\nconfig: net\n"
        f"network: {{cidr: 10.{100 + secrets.randbelow(100)}.0.0/16, namePrefix: dkr{tag}-, "
        f"linkPrefix: r{tag}}}\n"
        "services:\n  - name: redis\n    ports: [{name: tcp-redis, port: 6379}]\n"
        "workloads:\n"
        "  - name: redis-v1\n    labels: {app: redis, version: v1}\n    serviceAccount: redis\n"
        '    command: ["redis-server", "--port", "6379", "--save", "", "--appendonly", "no"]\n'
        f"  - name: client-v1\n    labels: {{app: client}}\n    serviceAccount: client\n"
        f"    command: {sleeper}\n"
        f"  - name: intruder-v1\n    labels: {{app: intruder}}\n    serviceAccount: intruder\n"
        f"    command: {sleeper}\n"
    )
    env = {**os.environ, "DIKTYO_HOME": str(tmp_path / "home"), "NO_PROXY": "*"}
    netns = Netns(prefix=f"dkr{tag}-", link_prefix=f"r{tag}")
    up = _diktyo("up", "-f", str(tmp_path / "mesh.yaml"), "--detach", "--timeout", "90", env=env)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        state = json.loads(_diktyo("status", "-o", "json", env=env).stdout)
        rows = {w["name"]: w for w in state["workloads"]}
        client, redis, intruder = rows["client-v1-1"], rows["redis-v1-1"], rows["intruder-v1-1"]
        assert client["capture"] == redis["capture"] == "transparent"

        def cli(row: dict[str, str], *args: str, uid: int | None = None) -> str:
            out = _in_ns(row["netns"], "redis-cli", "-h", "redis", "-p", "6379", *args, uid=uid)
            return (out.stdout + out.stderr).strip()

        eventually_sync(  # until both sidecars have the policies applied
            lambda: cli(client, "SET", "mesh", "diktyo") == "OK",
            timeout=30,
            interval=0.5,
            what="SET through both sidecars",
        )
        assert cli(client, "GET", "mesh") == "diktyo"

        sel = {"reporter": "source", "destination_service": REDIS, "request_protocol": "tcp"}
        text = _wait_metric(client["address"], "istio_tcp_connections_closed_total", 2, **sel)
        assert _metric(text, "istio_tcp_sent_bytes_total", **sel) > 0
        assert _metric(text, "istio_tcp_connections_opened_total", **sel,
                       destination_principal="spiffe://cluster.local/ns/default/sa/redis") >= 2  # fmt: skip
        text = _wait_metric(redis["address"], "istio_tcp_connections_closed_total", 2,
                            reporter="destination", connection_security_policy="mutual_tls",
                            source_principal="spiffe://cluster.local/ns/default/sa/client")  # fmt: skip
        assert _metric(text, "istio_tcp_received_bytes_total", reporter="destination") > 0

        # the AuthorizationPolicy admits only the client's identity on 6379
        assert "diktyo" not in cli(intruder, "GET", "mesh")
        # STRICT: plaintext straight to the Redis pod (uid 1337 is not captured) is refused
        plain = _in_ns(client["netns"], "redis-cli", "-h", redis["address"], "-p", "6379",
                       "PING", uid=1337)  # fmt: skip
        assert "PONG" not in plain.stdout
    finally:
        down = _diktyo("down", env=env)
        assert down.returncode == 0, down.stdout + down.stderr
    assert netns.leftovers() == {"namespaces": [], "links": [], "hosts": []}
