"""Two hosts join a control plane with ``diktyo join`` (two agent processes on one machine, each
with its own loopback address): their workloads auto-register, talk through their sidecars with
mTLS, health probes take an entry out and back, and a killed host's entry is removed after the
grace period."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from diktyo.control.autoregister import DISCONNECTED_AT
from diktyo.control.server import ControlPlane
from diktyo.platform.join import JoinAgent, JoinError, load_host_file
from diktyo.security.admin_token import write_secret
from diktyo.testing import eventually

pytestmark = pytest.mark.slow

APPS = Path(__file__).parent.parent / "e2e" / "apps"

CONFIG = """
apiVersion: networking.istio.io/v1
kind: WorkloadGroup
metadata: {name: front}
spec:
  metadata: {labels: {app: front}}
  template: {ports: {http: 9080}, serviceAccount: front-sa}
---
apiVersion: networking.istio.io/v1
kind: WorkloadGroup
metadata: {name: ratings}
spec:
  metadata: {labels: {app: ratings, version: v1}}
  template: {ports: {http: 9080}, serviceAccount: ratings-sa}
  probe:
    periodSeconds: 1
    httpGet: {port: 9080, path: /healthz}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: front}
spec:
  hosts: [front.default.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 9080, name: http, protocol: HTTP}]
  workloadSelector: {labels: {app: front}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ratings}
spec:
  hosts: [ratings.default.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 9080, name: http, protocol: HTTP}]
  workloadSelector: {labels: {app: ratings}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: ratings-strict}
spec:
  selector: {matchLabels: {app: ratings}}
  mtls: {mode: STRICT}
"""


async def _agent(
    tmp: Path, name: str, cp: ControlPlane, sa: str, host: str
) -> tuple[asyncio.subprocess.Process, dict[str, Any]]:
    token = tmp / f"{name}.token"
    write_secret(token, cp.identity.token_for("default", sa))
    host_file = tmp / f"{name}.yaml"
    host_file.write_text(host)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "diktyo.cli.main", "join",
        "--control-plane", cp.url, "--token-file", str(token), "--host-file", str(host_file),
        "--log-dir", str(tmp / f"{name}-logs"),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    while True:
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        assert line, f"agent {name} exited with {await proc.wait()}"
        if line.startswith(b'{"event": "joined"'):
            return proc, json.loads(line)


async def _get(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=10)) as resp:
        return resp.status, await resp.text()


def _entry(cp: ControlPlane, name: str) -> Any:
    return cp.autoregister.store.get("WorkloadEntry", "default", name)


@pytest.mark.timeout(150)
async def test_two_hosts_join_talk_mtls_follow_probes_and_a_killed_host_leaves(
    tmp_path: Path,
) -> None:
    cp = ControlPlane(observability=False, debounce=0.02)
    cp.autoregister.grace_period = 2.0
    await cp.start()
    procs: list[asyncio.subprocess.Process] = []
    try:
        _, errors = cp.store.apply_text(CONFIG, "fleet.yaml")
        assert not errors
        flag = tmp_path / "ratings-unhealthy"
        host_b = (
            "address: 127.0.0.3\nlocality: eu-west/zone-b\nworkloads:\n- group: ratings\n"
            f'  command: ["{sys.executable}", "{APPS / "join_echo.py"}", "{flag}"]\n'
        )
        host_a = (
            "address: 127.0.0.2\nworkloads:\n- group: front\n"
            f'  command: ["{sys.executable}", "{APPS / "tiny_app.py"}"]\n'
        )
        b, joined_b = await _agent(tmp_path, "host-b", cp, "ratings-sa", host_b)
        procs.append(b)
        a, joined_a = await _agent(tmp_path, "host-a", cp, "front-sa", host_a)
        procs.append(a)
        assert [w["entry"] for w in joined_b["workloads"]] == ["ratings-127.0.0.3"]
        assert [w["entry"] for w in joined_a["workloads"]] == ["front-127.0.0.2"]
        ratings = _entry(cp, "ratings-127.0.0.3")
        assert ratings.spec.address == "127.0.0.3" and ratings.spec.locality == "eu-west/zone-b"
        assert ratings.labels == {"app": "ratings", "version": "v1"}
        front_port = joined_a["workloads"][0]["inbound_ports"]["9080"]
        call = f"http://127.0.0.2:{front_port}/call/ratings:9080/echo"

        async with aiohttp.ClientSession() as session:
            # host A's app -> its sidecar -> mTLS -> host B's sidecar -> host B's app
            async def reaches_b() -> dict[str, Any] | None:
                status, body = await _get(session, call)
                return json.loads(body) if status == 200 else None

            seen = await eventually(reaches_b, timeout=20, what="front -> ratings")
            assert seen["pod"] == "ratings-127.0.0.3"
            xfcc = seen["headers"]["x-forwarded-client-cert"]
            assert xfcc.startswith("By=spiffe://cluster.local/ns/default/sa/ratings-sa;")
            assert xfcc.endswith(";URI=spiffe://cluster.local/ns/default/sa/front-sa")

            # the group's probe: the app fails its health check -> no endpoint; back -> traffic
            flag.touch()
            await eventually(
                lambda: (
                    _entry(cp, "ratings-127.0.0.3").status["conditions"][0]["status"] == "False"
                ),
                timeout=15,
            )

            async def refused() -> bool:
                status, body = await _get(session, call)
                return status == 502 and "503" in body

            await eventually(refused, timeout=10, what="no healthy ratings endpoint")
            flag.unlink()
            await eventually(reaches_b, timeout=15, what="ratings healthy again")

            # host B's sidecar crashes: the agent starts it again on the same ports
            os.kill(joined_b["workloads"][0]["sidecar_pid"], signal.SIGKILL)
            await eventually(refused, timeout=10, what="ratings down with its sidecar")
            await eventually(reaches_b, timeout=30, what="ratings' sidecar restarted")

            # kill host B's agent: its sidecar and app die with it, the entry is marked
            # disconnected at once and removed after the grace period (2 s here)
            b.send_signal(signal.SIGKILL)
            await b.wait()
            await eventually(
                lambda: DISCONNECTED_AT in _entry(cp, "ratings-127.0.0.3").annotations,
                timeout=15,
            )
            marked = asyncio.get_running_loop().time()
            await eventually(lambda: _entry(cp, "ratings-127.0.0.3") is None, timeout=15)
            assert asyncio.get_running_loop().time() - marked >= 1.0  # not before the grace
            assert _entry(cp, "front-127.0.0.2") is not None  # host A stays
            await eventually(refused, timeout=10, what="ratings gone with its host")
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), 30)
                except TimeoutError:
                    os.kill(proc.pid, signal.SIGKILL)
        await cp.stop()


def test_host_file_errors_name_file_line_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "host.yaml"
    bad.write_text("address: 127.0.0.2\nworkloads:\n- namespace: shop\n  comand: [x]\n")
    with pytest.raises(JoinError) as exc:
        load_host_file(bad)
    text = str(exc.value)
    assert f"{bad}:3: error: workloads[0].group: Field required" in text
    assert f"{bad}:4: error: workloads[0].comand: Extra inputs are not permitted" in text


async def test_an_address_this_host_lacks_is_refused_before_anything_registers(
    tmp_path: Path,
) -> None:
    # 192.0.2.0/24 is TEST-NET-1: never an address of this machine. Without the check the
    # agent registered first and died with a traceback when its sidecar's port was picked.
    host = tmp_path / "host.yaml"
    host.write_text("address: 192.0.2.7\nworkloads:\n- group: front\n")
    agent = JoinAgent(load_host_file(host), ["http://127.0.0.1:9"], ready_timeout=2)
    try:
        with pytest.raises(JoinError) as exc:
            await agent.start()
    finally:
        await agent.stop()
    assert "host file address '192.0.2.7' is not an address of this host" in str(exc.value)
    assert "ip netns exec" in str(exc.value)
    assert agent.runs == []  # no token read, no registration session opened


@pytest.mark.parametrize(
    ("address", "words"),
    [
        ("0.0.0.0", "is the unspecified address"),
        ('"::"', "is the unspecified address"),
        ("224.0.0.5", "is a multicast address"),
        ("ff02::1", "is a multicast address"),
        ("255.255.255.255", "is the broadcast address"),
    ],
)
def test_a_host_address_no_peer_can_reach_is_refused(
    tmp_path: Path, address: str, words: str
) -> None:
    # 0.0.0.0 used to pass: the sidecars could bind it, and the WorkloadEntry then told every
    # other workload to send to 0.0.0.0
    host = tmp_path / "host.yaml"
    host.write_text(f"# fleet host\nworkloads:\n- group: front\naddress: {address}\n")
    with pytest.raises(JoinError) as exc:
        load_host_file(host, ["http://127.0.0.1:15010"])
    text = str(exc.value)
    assert text.startswith(f"{host}:4: error: address: "), text
    assert words in text
    assert "'ip -br addr'" in text  # the hint


def test_a_loopback_host_address_is_refused_only_with_a_remote_control_plane(
    tmp_path: Path,
) -> None:
    host = tmp_path / "host.yaml"
    host.write_text("address: 127.0.0.2\nworkloads:\n- group: front\n")
    for local in (["http://127.0.0.1:15010"], ["http://localhost:15010"], ["http://[::1]:1"], []):
        assert load_host_file(host, local).address == "127.0.0.2"
    with pytest.raises(JoinError) as exc:
        load_host_file(host, ["http://127.0.0.1:15010", "http://192.0.2.10:15010"])
    text = str(exc.value)
    assert text.startswith(f"{host}:1: error: address: '127.0.0.2' is a loopback address")
    assert "http://192.0.2.10:15010 is on another host" in text


def test_join_command_reports_a_bad_host_address_before_starting(tmp_path: Path) -> None:
    import subprocess

    host = tmp_path / "host.yaml"
    host.write_text("address: 0.0.0.0\nworkloads:\n- group: front\n")
    proc = subprocess.run(
        [sys.executable, "-m", "diktyo.cli.main", "join", "--control-plane",
         "http://127.0.0.1:9", "--host-file", str(host)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert f"diktyo join: {host}:1: error: address: '0.0.0.0' is the unspecified" in proc.stderr
