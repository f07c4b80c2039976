"""Hosts that join the mesh as network namespaces (issue 15): two "hosts" are two namespaces on
a test bridge, each with its own address and its own ``diktyo join`` agent started with
``ip netns exec``; the control plane listens on the bridge's address. Host A's app reaches host
B's WorkloadEntry through both sidecars with mutual TLS across the veth pairs, and a
``kill -9`` of host B's agent takes its sidecar and app with it and its entry out after the
grace period. Needs root, ``ip`` and ``iptables`` (as transparent mode)."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from diktyo.control.autoregister import DISCONNECTED_AT
from diktyo.control.server import ControlPlane
from diktyo.platform.capture_netns import AddressPlan, Netns, capture_unavailable_reason
from diktyo.security.admin_token import write_secret
from diktyo.testing import eventually

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        capture_unavailable_reason() is not None,
        reason=f"host namespaces unavailable: {capture_unavailable_reason()}",
    ),
    pytest.mark.timeout(150),
]

TINY_APP = Path(__file__).parent / "apps" / "tiny_app.py"
JOIN_ECHO = Path(__file__).parent / "apps" / "join_echo.py"  # shared with tests/platform/test_join.py

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
  metadata: {labels: {app: ratings}}
  template: {ports: {http: 9080}, serviceAccount: ratings-sa}
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
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: ratings-strict}
spec:
  selector: {matchLabels: {app: ratings}}
  mtls: {mode: STRICT}
"""


def _ip(*argv: str) -> str:
    out = subprocess.run(["ip", *argv], capture_output=True, text=True, timeout=20, check=True)
    return out.stdout


async def _join_in(
    ns: str, tmp: Path, name: str, cp: ControlPlane, sa: str, host: str
) -> tuple[asyncio.subprocess.Process, dict[str, Any]]:
    """A ``diktyo join`` agent inside namespace ``ns``; its "joined" line."""
    token = tmp / f"{name}.token"
    write_secret(token, cp.identity.token_for("default", sa))
    host_file = tmp / f"{name}.yaml"
    host_file.write_text(host)
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    proc = await asyncio.create_subprocess_exec(
        *Netns.exec_argv(ns, [
            sys.executable, "-m", "diktyo.cli.main", "join",
            "--control-plane", cp.url, "--token-file", str(token), "--host-file", str(host_file),
            "--log-dir", str(tmp / f"{name}-logs"),
        ]),
        stdout=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    assert proc.stdout is not None
    while True:
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        assert line, f"agent {name} exited with {await proc.wait()}"
        if line.startswith(b'{"event": "joined"'):
            return proc, json.loads(line)


def _entry(cp: ControlPlane, name: str) -> Any:
    return cp.autoregister.store.get("WorkloadEntry", "default", name)


async def test_hosts_in_their_own_network_namespaces_join_talk_mtls_and_leave(
    tmp_path: Path,
) -> None:
    tag = secrets.token_hex(2)
    netns = Netns(prefix=f"dkj{tag}-", link_prefix=f"j{tag}")
    # a /24 of its own, away from the local platform's 10.209/16 and the other tests' ranges
    plan = AddressPlan(f"10.{220 + secrets.randbelow(30)}.{secrets.randbelow(256)}.0/24")
    cp = ControlPlane(observability=False, debounce=0.02)
    cp.autoregister.grace_period = 2.0
    procs: list[asyncio.subprocess.Process] = []
    try:
        netns.create_bridge(plan)
        addr_a, addr_b = plan.pod("host-a"), plan.pod("host-b")
        ns_a = netns.add_namespace("host-a", addr_a, plan)
        ns_b = netns.add_namespace("host-b", addr_b, plan)
        for ns in (ns_a, ns_b):  # the range on eth0 is the only route: nothing leaves the machine
            routes = _ip("-n", ns, "route", "show")
            assert "default" not in routes and f"{plan.net} dev eth0" in routes, routes
        # the control plane listens on the bridge, the one address the namespaces reach
        await cp.start(host=plan.gateway)
        assert cp.url.startswith(f"http://{plan.gateway}:")
        _, errors = cp.store.apply_text(CONFIG, "fleet.yaml")
        assert not errors

        # an agent in host A's namespace whose host file names host B's address is refused at
        # once, before it registers anything (B's address exists only in B's namespace)
        write_secret(tmp_path / "wrong.token", cp.identity.token_for("default", "front-sa"))
        (tmp_path / "wrong.yaml").write_text(f"address: {addr_b}\nworkloads:\n- group: front\n")
        wrong = await asyncio.create_subprocess_exec(
            *Netns.exec_argv(ns_a, [
                sys.executable, "-m", "diktyo.cli.main", "join", "--control-plane", cp.url,
                "--token-file", str(tmp_path / "wrong.token"),
                "--host-file", str(tmp_path / "wrong.yaml"),
            ]),
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await asyncio.wait_for(wrong.communicate(), 60)
        assert wrong.returncode == 1, err
        assert f"host file address '{addr_b}' is not an address of this host" in err.decode()
        assert _entry(cp, f"front-{addr_b}") is None

        b, joined_b = await _join_in(
            ns_b, tmp_path, "host-b", cp, "ratings-sa",
            f"address: {addr_b}\nworkloads:\n- group: ratings\n"
            f'  command: ["{sys.executable}", "{JOIN_ECHO}"]\n',
        )  # fmt: skip
        procs.append(b)
        a, joined_a = await _join_in(
            ns_a, tmp_path, "host-a", cp, "front-sa",
            f"address: {addr_a}\nworkloads:\n- group: front\n"
            f'  command: ["{sys.executable}", "{TINY_APP}"]\n',
        )  # fmt: skip
        procs.append(a)
        assert [w["entry"] for w in joined_b["workloads"]] == [f"ratings-{addr_b}"]
        assert [w["entry"] for w in joined_a["workloads"]] == [f"front-{addr_a}"]
        assert _entry(cp, f"ratings-{addr_b}").spec.address == addr_b
        # each agent, sidecar and app runs in its host's namespace
        pids_b = set(netns.pids_in(ns_b))
        assert {b.pid, joined_b["workloads"][0]["sidecar_pid"]} <= pids_b
        assert joined_b["workloads"][0]["app_pid"] in pids_b
        assert a.pid in netns.pids_in(ns_a) and a.pid not in pids_b

        # from this (the machine's) namespace over the bridge to host A's inbound listener;
        # host A's app -> its sidecar -> eth0/veth/bridge/veth/eth0 -> host B's sidecar (STRICT)
        front_port = joined_a["workloads"][0]["inbound_ports"]["9080"]
        call = f"http://{addr_a}:{front_port}/call/ratings:9080/hello"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:

            async def get() -> tuple[int, str]:
                async with session.get(call) as resp:
                    return resp.status, await resp.text()

            async def reaches_b() -> dict[str, Any] | None:
                status, body = await get()
                return json.loads(body) if status == 200 else None

            seen = await eventually(
                reaches_b, timeout=30, ignore=(aiohttp.ClientError,), what="host A -> host B"
            )
            assert seen["pod"] == f"ratings-{addr_b}"
            xfcc = seen["headers"]["x-forwarded-client-cert"]
            assert xfcc.startswith("By=spiffe://cluster.local/ns/default/sa/ratings-sa;")
            assert xfcc.endswith(";URI=spiffe://cluster.local/ns/default/sa/front-sa")
            # host B's sidecar saw the connection come from host A's namespace address
            hops = [h.strip() for h in seen["headers"]["x-forwarded-for"].split(",")]
            assert hops[-1] == addr_a, hops

            # kill -9 host B's agent: its sidecar and app die with it (nothing is left in the
            # namespace), the entry is marked disconnected, and removed after the grace period
            b.send_signal(signal.SIGKILL)
            await b.wait()
            await eventually(lambda: not netns.pids_in(ns_b), timeout=15, what="host B empty")
            await eventually(
                lambda: DISCONNECTED_AT in _entry(cp, f"ratings-{addr_b}").annotations,
                timeout=15,
            )
            marked = asyncio.get_running_loop().time()
            await eventually(lambda: _entry(cp, f"ratings-{addr_b}") is None, timeout=15)
            assert asyncio.get_running_loop().time() - marked >= 1.0  # not before the grace
            assert _entry(cp, f"front-{addr_a}") is not None  # host A stays

            async def refused() -> bool:
                status, _ = await get()
                return status == 502

            await eventually(
                refused, timeout=15, ignore=(aiohttp.ClientError,), what="ratings gone"
            )
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), 30)
                except TimeoutError:
                    proc.kill()
        for ns in netns.namespaces():  # anything an agent left running
            for pid in netns.pids_in(ns):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        netns.remove_all()
        await cp.stop()
    assert netns.leftovers() == {"namespaces": [], "links": [], "hosts": []}
