"""The local mesh in transparent mode (``capture: transparent``), on real namespaces: each
instance in its own namespace and address, the sidecar as uid 1337 beside it, the app without
proxy settings, names and capture rules in place, status showing it, and nothing left behind
by stop() or by a crashed earlier run."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import secrets
import subprocess
import urllib.request
from pathlib import Path

import pytest

from diktyo.platform.capture_mesh import capture_mode
from diktyo.platform.capture_netns import Netns, capture_unavailable_reason
from diktyo.platform.mesh import MeshFileError, load_mesh_text
from diktyo.platform.supervisor import LocalMesh, MeshStartError
from diktyo.testing import eventually
from diktyo.testing.controlplane import admin_get

ROOT = Path(__file__).resolve().parents[2]
TINY_APP = ROOT / "tests" / "e2e" / "apps" / "tiny_app.py"

needs_netns = pytest.mark.skipif(
    capture_unavailable_reason() is not None,
    reason=f"transparent mode unavailable: {capture_unavailable_reason()}",
)


def mesh_text(tag: str, octet: int) -> str:
    return f"""
name: t{tag}
capture: transparent
network: {{cidr: 10.{octet}.0.0/16, namePrefix: dkm{tag}-, linkPrefix: m{tag}}}
services:
  - name: hello
    ports: [{{name: http, port: 9080}}]
  - name: front
    namespace: web
    ports: [{{name: http, port: 9080}}]
workloads:
  - name: hello-v1
    labels: {{app: hello, version: v1}}
    replicas: 2
    command: ["{{python}}", "{TINY_APP}"]
  - name: front-v1
    namespace: web
    labels: {{app: front, version: v1}}
    annotations: {{traffic.sidecar.istio.io/excludeOutboundPorts: "5432", traffic.sidecar.istio.io/excludeInboundPorts: "9901"}}
    command: ["{{python}}", "{TINY_APP}"]
"""


def _proc_field(pid: int, name: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return line.split()[1]
    raise AssertionError(f"no {name} line")


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(e.decode().split("=", 1) for e in raw if b"=" in e)


def _netns_of(pid: int) -> str:
    return str(Path(f"/proc/{pid}/ns/net").readlink())


@needs_netns
@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_transparent_mesh_namespaces_addresses_uids_and_cleanup() -> None:
    tag = secrets.token_hex(2)
    spec = load_mesh_text(mesh_text(tag, 100 + secrets.randbelow(100)), "t.yaml", base_dir="/")
    netns = Netns(prefix=f"dkm{tag}-", link_prefix=f"m{tag}")
    # what a crashed earlier run left: a namespace and its hosts folder under the prefixes
    await asyncio.to_thread(subprocess.run, ["ip", "netns", "add", f"dkm{tag}-stale"], check=True)
    Path(f"/etc/netns/dkm{tag}-stale").mkdir(parents=True, exist_ok=True)
    out = io.StringIO()
    mesh = LocalMesh(spec, out=out, ready_timeout=40)
    try:
        await asyncio.wait_for(mesh.start(), 90)
        assert f"dkm{tag}-stale" not in netns.namespaces()
        assert "removed what an earlier run left behind" in out.getvalue()
        assert "capture: transparent" in out.getvalue()
        reps = {r.name: r for r in mesh.replicas}
        assert set(reps) == {"hello-v1-1", "hello-v1-2", "front-v1-1"}
        addresses = {r.address for r in reps.values()}
        assert len(addresses) == 3 and all(
            a.startswith(str(spec.network.cidr)[:5]) for a in addresses
        )
        host_ns = _netns_of(os.getpid())
        for r in reps.values():
            assert r.sidecar is not None and r.app is not None
            assert r.sidecar.pid is not None and r.app.pid is not None
            # sidecar and app share the instance's own namespace, not the host's
            assert _netns_of(r.sidecar.pid) == _netns_of(r.app.pid) != host_ns
            assert _proc_field(r.sidecar.pid, "Uid") == "1337"  # excluded from capture
            assert _proc_field(r.sidecar.pid, "Gid") == "1337"
            env = _environ(r.app.pid)
            assert "HTTP_PROXY" not in env and "http_proxy" not in env
            assert env["PORT"] == "9080"
            saved = await asyncio.to_thread(
                subprocess.run,
                ["ip", "netns", "exec", r.netns, "iptables-save", "-t", "nat"],
                capture_output=True,
                text=True,
                check=True,
            )
            rules = saved.stdout
            assert "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001" in rules
            if r.workload == "front-v1":  # its traffic.sidecar.istio.io annotations
                assert "--dports 15090,15021,15020,15000,9901 -j RETURN" in rules
                assert "-A ISTIO_OUTPUT -p tcp -m multiport --dports 5432 -j RETURN" in rules
            else:
                assert "--dports 15090,15021,15020,15000 -j RETURN" in rules
                assert "5432" not in rules
        # services have virtual IPs in the upper half; names resolve to them by namespace
        view = mesh.cp.registry.view()
        vips = {s.short_name: s.addresses for s in view.services}
        hello_vip = vips["hello"][0]
        hosts = Path(f"/etc/netns/{reps['front-v1-1'].netns}/hosts").read_text()
        assert f"{hello_vip}\thello.default hello.default.svc" in hosts  # other namespace
        hosts = Path(f"/etc/netns/{reps['hello-v1-1'].netns}/hosts").read_text()
        assert f"{hello_vip}\thello hello.default" in hosts  # its own namespace: short name too
        # endpoints: the instance's address and the app's own port
        inst = {i.name: i for i in view.instances}
        assert inst["hello-v1-2"].address == reps["hello-v1-2"].address
        assert inst["hello-v1-2"].ports == {9080: 9080}
        # status shows address and capture mode
        desc = json.loads(json.dumps(mesh.describe()))
        assert desc["capture"] == "transparent"
        row = next(w for w in desc["workloads"] if w["name"] == "front-v1-1")
        assert row["address"] == reps["front-v1-1"].address and row["capture"] == "transparent"
        assert len(netns.namespaces()) == 3
        # the dashboard's workload list (v1/workloads) carries them too
        code, text = await asyncio.to_thread(admin_get, mesh.cp, mesh.cp.url + "/v1/workloads")
        assert code == 200
        listed = {w["name"]: w for w in json.loads(text)["workloads"]}
        assert listed["hello-v1-2"]["address"] == reps["hello-v1-2"].address
        assert listed["hello-v1-2"]["capture"] == "transparent"
    finally:
        await asyncio.wait_for(mesh.stop(), 40)
        print(out.getvalue())
    assert netns.leftovers() == {"namespaces": [], "links": [], "hosts": []}


def test_capture_mode_auto_and_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    import diktyo.platform.capture_mesh as cm

    monkeypatch.delenv("DIKTYO_CAPTURE", raising=False)
    spec = load_mesh_text("capture: auto\n", "m.yaml")
    monkeypatch.setattr(cm, "capture_unavailable_reason", lambda: "needs root (test)")
    mode, why = capture_mode(spec)
    assert mode == "proxy" and "needs root (test)" in why and "HTTP_PROXY" in why
    with pytest.raises(
        RuntimeError, match=r"capture: transparent is not possible here: needs root"
    ):
        capture_mode(load_mesh_text("capture: transparent\n", "m.yaml"))
    monkeypatch.setattr(cm, "capture_unavailable_reason", lambda: None)
    monkeypatch.setattr(cm, "probe_capture", lambda: "iptables nat rules cannot be installed: x")
    mode, why = capture_mode(spec)  # auto tries it for real: a failed probe means proxy mode
    assert mode == "proxy" and "nat rules cannot be installed" in why
    monkeypatch.setattr(cm, "probe_capture", lambda: None)
    assert capture_mode(spec)[0] == "transparent"
    assert capture_mode(load_mesh_text("capture: proxy\n", "m.yaml"))[0] == "proxy"
    # the default is auto: transparent where namespaces can be made
    assert capture_mode(load_mesh_text("name: x\n", "m.yaml")) == (
        "transparent",
        "capture: auto (the default)",
    )
    # $DIKTYO_CAPTURE decides for a file without 'capture:', never against one that has it
    monkeypatch.setenv("DIKTYO_CAPTURE", "proxy")
    assert capture_mode(load_mesh_text("name: x\n", "m.yaml")) == (
        "proxy",
        "capture: proxy ($DIKTYO_CAPTURE)",
    )
    assert capture_mode(load_mesh_text("capture: auto\n", "m.yaml"))[0] == "transparent"
    monkeypatch.setenv("DIKTYO_CAPTURE", "sideways")
    with pytest.raises(RuntimeError, match="DIKTYO_CAPTURE='sideways'"):
        capture_mode(load_mesh_text("name: x\n", "m.yaml"))


def test_transparent_impossible_is_a_clear_start_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import diktyo.platform.capture_mesh as cm

    monkeypatch.setattr(cm, "capture_unavailable_reason", lambda: "network namespaces need Linux")
    with pytest.raises(MeshStartError, match="set 'capture: proxy'"):
        LocalMesh(load_mesh_text("capture: transparent\n", "m.yaml"), out=io.StringIO())


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("capture: magic\n", "capture"),
        ("network: {cidr: 8.8.0.0/16}\n", "private"),
        ("network: {cidr: nonsense}\n", "CIDR form"),
        ("network: {linkPrefix: waytoolongprefix}\n", "linkPrefix"),
        (
            (
                "workloads: [{name: a, command: x, annotations: "
                "{traffic.sidecar.istio.io/excludeOutboundPorts: smtp}}]\n"
            ),
            "outbound_ports_exclude: 'smtp' is not a port number",
        ),
    ],
)
def test_bad_capture_settings_name_file_line_and_field(text: str, words: str) -> None:
    with pytest.raises(MeshFileError) as err:
        load_mesh_text(text, "m.yaml")
    assert "m.yaml:1:" in str(err.value) and words in str(err.value)


def test_load_via_a_transparent_replica_runs_in_its_namespace() -> None:
    from diktyo.cli.load import proxy_via

    state = {
        "name": "m",
        "workloads": [
            {"name": "sleep-1", "workload": "sleep", "state": "ready", "kind": "workload",
             "netns": "diktyo-default-sleep-1", "outbound_port": 0},
            {"name": "web-1", "workload": "web", "state": "ready", "kind": "workload",
             "netns": "", "outbound_port": 15999},
        ],
    }  # fmt: skip
    assert proxy_via(state, "sleep") == "netns:diktyo-default-sleep-1"
    assert proxy_via(state, "web") == "http://127.0.0.1:15999"


def test_prometheus_targets_are_the_replicas_own_addresses_in_transparent_mode() -> None:
    from diktyo.cli.prometheus_config import targets_of

    got = targets_of(
        [
            {"name": "a-1", "workload": "a", "admin_port": 15000, "address": "10.209.0.2"},
            {"name": "b-1", "workload": "b", "admin_port": 41234, "address": "127.0.0.1"},
            {"name": "gw", "workload": "gw", "admin_port": 41235},
        ]
    )
    assert [t.address for t in got] == ["10.209.0.2:15000", "127.0.0.1:41234", "127.0.0.1:41235"]


@needs_netns
def test_probe_capture_succeeds_here_and_leaves_nothing() -> None:
    from diktyo.platform.capture_netns import probe_capture

    assert probe_capture() is None
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    assert f"dkprobe-{os.getpid()}" not in listed.stdout


async def test_a_mesh_of_another_capture_mode_is_not_adopted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An orphaned proxy-mode mesh and a supervisor that resolves 'auto' to transparent (or
    the other way round) must not mix: adopt() refuses with the fix."""
    import diktyo.platform.capture_mesh as cm

    monkeypatch.setattr(cm, "capture_unavailable_reason", lambda: "no namespaces (test)")
    mesh = LocalMesh(load_mesh_text("capture: auto\n", "m.yaml"), out=io.StringIO())
    assert mesh.capture == "proxy"
    with pytest.raises(MeshStartError, match="cannot adopt it: stop it with 'diktyo down'"):
        await mesh.adopt({"name": "old", "capture": "transparent", "workloads": []})
    await mesh.stop()


@needs_netns
@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_transparent_sidecars_export_spans_and_stop_without_warnings() -> None:
    # A sidecar in a namespace was told to export spans to the control plane's 127.0.0.1 URL,
    # its namespace's own loopback: every span was lost and each flush logged a failed export
    # (seen on 'diktyo down'). The embedded collector is now a path on the control plane the
    # sidecar talks to, which it reaches through the bridge.
    tag = secrets.token_hex(2)
    text = f"""
name: s{tag}
capture: transparent
network: {{cidr: 10.{100 + secrets.randbelow(100)}.0.0/16, namePrefix: dks{tag}-, linkPrefix: s{tag}}}
tracing: {{sampling: 100}}
services:
  - name: hello
    ports: [{{name: http, port: 9080}}]
workloads:
  - name: hello-v1
    labels: {{app: hello, version: v1}}
    command: ["{{python}}", "{TINY_APP}"]
"""
    spec = load_mesh_text(text, "s.yaml", base_dir="/")
    netns = Netns(prefix=f"dks{tag}-", link_prefix=f"s{tag}")
    out = io.StringIO()
    mesh = LocalMesh(spec, out=out, ready_timeout=40)
    try:
        await asyncio.wait_for(mesh.start(), 90)
        (rep,) = mesh.replicas
        url = f"http://{rep.address}:9080/"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        async def traced() -> list[dict[str, object]]:
            with await asyncio.to_thread(opener.open, url, timeout=5) as r:
                assert r.status == 200
            code, body = await asyncio.to_thread(
                admin_get, mesh.cp, mesh.cp.url + "/telemetry/api/traces?limit=5"
            )
            assert code == 200
            return json.loads(body)["traces"]  # type: ignore[no-any-return]

        await eventually(
            traced,
            timeout=30,
            interval=0.5,
            what=lambda: "a span from the sidecar at the control plane\n" + out.getvalue(),
        )
    finally:
        await asyncio.wait_for(mesh.stop(), 40)
        print(out.getvalue())
    logged = out.getvalue()
    # the sidecars' own log lines are echoed into out ("[hello-v1-1 sidecar] ..."): none may
    # be a warning or an error, neither while serving nor while the mesh stops
    bad = [
        ln for ln in logged.splitlines() if re.search(r"\b(WARNING|ERROR|CRITICAL)\b|Traceback", ln)
    ]
    assert bad == []
    assert netns.leftovers() == {"namespaces": [], "links": [], "hosts": []}
