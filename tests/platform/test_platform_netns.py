"""Transparent mode's platform side on real network namespaces (needs root, ip, iptables):
addresses on a bridge, names, no route off the machine, Istio's redirect rules doing what they
say, and cleanup that leaves nothing behind. Every test uses its own name prefixes and range."""

from __future__ import annotations

import json
import random
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from diktyo.cli.main import main
from diktyo.platform.capture_netns import (
    AddressPlan,
    Netns,
    capture_unavailable_reason,
    hosts_file,
    service_names,
)
from diktyo.testing import eventually_sync

PROBE = str(Path(__file__).resolve().parent / "helpers" / "capture_probe.py")

pytestmark = pytest.mark.skipif(
    capture_unavailable_reason() is not None,
    reason=f"transparent mode unavailable: {capture_unavailable_reason()}",
)


class Net:
    """Two namespaces ``a`` and ``b`` on a test bridge; ``reviews`` has a VIP."""

    def __init__(self) -> None:
        tag = secrets.token_hex(2)
        self.netns = Netns(prefix=f"dkt{tag}-", link_prefix=f"t{tag}")
        self.plan = AddressPlan(f"10.{random.randint(100, 199)}.{random.randint(0, 255)}.0/24")
        self.procs: list[subprocess.Popen[str]] = []

    def setup(self) -> None:
        n, plan = self.netns, self.plan
        n.create_bridge(plan)
        self.a = n.add_namespace("a", plan.pod("a"), plan)
        self.b = n.add_namespace("b", plan.pod("b"), plan)
        self.vip = plan.vip("reviews.default.svc.cluster.local")
        entries = [
            (self.vip, service_names("reviews", "default")),
            (plan.pod("b"), ["b"]),
        ]
        for ns, short in ((self.a, "a"), (self.b, "b")):
            n.write_hosts(ns, hosts_file(entries, (plan.pod(short), short)))

    def run(self, ns: str, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            Netns.exec_argv(ns, list(argv)), check=False, capture_output=True, text=True, timeout=20
        )

    def listen(self, ns: str, *ports: int) -> subprocess.Popen[str]:
        p = subprocess.Popen(
            Netns.exec_argv(ns, [sys.executable, PROBE, "listen", *map(str, ports)]),
            stdout=subprocess.PIPE,
            text=True,
        )
        self.procs.append(p)
        assert p.stdout is not None
        assert json.loads(p.stdout.readline()) == {"ready": True}
        return p

    def connect(self, ns: str, host: str, port: int, uid: int | None = None) -> dict[str, str]:
        argv = [sys.executable, PROBE, "connect", host, str(port)]
        if uid is not None:
            argv.append(str(uid))
        out = self.run(ns, *argv)
        assert out.returncode == 0, out.stderr
        result: dict[str, str] = json.loads(out.stdout)
        return result

    def close(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()
        self.netns.remove_all()


@pytest.fixture
def net() -> Iterator[Net]:
    n = Net()
    try:
        n.setup()
        yield n
    finally:
        n.close()
    assert n.netns.leftovers() == {"namespaces": [], "links": [], "hosts": []}


def _accepted(p: subprocess.Popen[str]) -> dict[str, str]:
    assert p.stdout is not None
    line: dict[str, str] = json.loads(p.stdout.readline())
    return line


def test_each_instance_has_its_own_address_on_the_bridge(net: Net) -> None:
    server = net.listen(net.b, 9080)
    assert net.connect(net.a, net.plan.pod("b"), 9080) == {"reply": "ok"}
    seen = _accepted(server)
    assert seen["peer"] == net.plan.pod("a")  # a's own address, not the host's
    addrs = net.run(net.a, "ip", "-4", "-o", "addr", "show", "dev", "eth0").stdout
    assert f"{net.plan.pod('a')}/{net.plan.prefixlen}" in addrs
    # bridged frames skip the host's iptables (br_netfilter, Docker's FORWARD DROP)
    bridge = subprocess.run(
        ["ip", "-d", "link", "show", net.netns.bridge], capture_output=True, text=True, check=True
    ).stdout
    assert "nf_call_iptables 0" in bridge


def test_service_names_resolve_to_the_vip_inside_the_namespace(net: Net) -> None:
    for name in ("reviews", "reviews.default", "reviews.default.svc.cluster.local"):
        out = net.run(net.a, "getent", "hosts", name)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split()[0] == net.vip
    assert net.run(net.a, "getent", "hosts", "b").stdout.split()[0] == net.plan.pod("b")
    # the host's own /etc/hosts does not know the names
    assert (
        subprocess.run(
            ["getent", "hosts", "reviews.default.svc.cluster.local"],
            check=False,
            capture_output=True,
        ).returncode
        != 0
    )


def test_no_route_off_the_machine(net: Net) -> None:
    routes = net.run(net.a, "ip", "-4", "route", "show").stdout.strip().splitlines()
    assert len(routes) == 1 and routes[0].startswith(str(net.plan.net)), routes
    assert "default" not in " ".join(routes)
    for dest in ("1.1.1.1", "192.0.2.1", "8.8.8.8"):
        got = net.run(net.a, "ip", "route", "get", dest)
        assert got.returncode != 0 and "unreachable" in got.stderr.lower(), got
        assert net.connect(net.a, dest, 80) == {"error": "ENETUNREACH"}


def test_istio_rules_redirect_outbound_and_inbound_but_not_the_sidecar(net: Net) -> None:
    assert main(["init", "--apply", "--netns", net.a]) == 0
    # the 'sidecar' in a: capture listeners + an excluded admin-like port; b: a real upstream
    sidecar = net.listen(net.a, 15001, 15006, 15021)
    upstream = net.listen(net.b, 9080)

    # the app (uid 0) calls the service VIP: redirected to 15001, original dst kept
    assert net.connect(net.a, "reviews", 9080) == {"reply": "ok"}
    seen = _accepted(sidecar)
    assert seen["port"] == 15001 and seen["orig"] == f"{net.vip}:9080"

    # the sidecar (uid 1337) dials the endpoint itself: not captured, reaches b
    assert net.connect(net.a, net.plan.pod("b"), 9080, uid=1337) == {"reply": "ok"}
    assert _accepted(upstream)["peer"] == net.plan.pod("a")

    # inbound from b to a's app port: redirected to 15006 with the original port
    assert net.connect(net.b, net.plan.pod("a"), 9080) == {"reply": "ok"}
    seen = _accepted(sidecar)
    assert seen["port"] == 15006 and seen["orig"] == f"{net.plan.pod('a')}:9080"

    # 15021 is excluded inbound (Istio's readiness port): reaches the port itself
    assert net.connect(net.b, net.plan.pod("a"), 15021) == {"reply": "ok"}
    assert _accepted(sidecar)["port"] == 15021

    # the app calling 127.0.0.1 is never captured
    assert net.connect(net.a, "127.0.0.1", 15021) == {"reply": "ok"}
    assert _accepted(sidecar)["port"] == 15021


def test_init_cleanup_removes_the_chains(net: Net) -> None:
    assert main(["init", "--apply", "--netns", net.a, "-b", "9080"]) == 0
    saved = net.run(net.a, "iptables-save", "-t", "nat").stdout
    assert ":ISTIO_OUTPUT" in saved and "--dport 9080 -j ISTIO_IN_REDIRECT" in saved
    # applying again replaces (no 'chain already exists')
    assert main(["init", "--apply", "--netns", net.a, "-b", "9443"]) == 0
    saved = net.run(net.a, "iptables-save", "-t", "nat").stdout
    assert "9080" not in saved and "--dport 9443" in saved
    assert main(["init", "--cleanup", "--netns", net.a]) == 0
    saved = net.run(net.a, "iptables-save", "-t", "nat").stdout
    assert "ISTIO" not in saved


def test_remove_all_after_a_crash_leaves_nothing(net: Net) -> None:
    """A supervisor killed mid-run leaves namespaces, veths, the bridge and hosts files with
    a process still inside: remove_all (what 'up' and 'down' call) takes them all."""
    stray = net.listen(net.a, 9999)
    before = net.netns.leftovers()
    assert len(before["namespaces"]) == 2 and len(before["hosts"]) == 2
    assert net.netns.bridge in before["links"]
    assert stray.pid in net.netns.pids_in(net.a) or net.netns.pids_in(net.a)
    stray.kill()
    stray.wait()
    removed = net.netns.remove_all()
    assert sorted(removed["namespaces"]) == before["namespaces"]
    eventually_sync(
        lambda: not any(net.netns.leftovers().values()), timeout=10, what="no leftovers"
    )
    assert net.netns.leftovers() == {"namespaces": [], "links": [], "hosts": []}


def test_address_plan_bad_ranges_are_refused() -> None:
    with pytest.raises(ValueError, match="private"):
        AddressPlan("8.8.0.0/16")
    with pytest.raises(ValueError, match="CIDR form"):
        AddressPlan("10.209.0.0/33")
    with pytest.raises(ValueError, match="/24 or larger"):
        AddressPlan("10.209.0.0/28")


def test_remove_all_never_touches_links_that_only_share_the_prefix(net: Net) -> None:
    """Another tool's veth whose name starts with the link prefix stays."""
    other = f"{net.netns.link_prefix}hx{secrets.token_hex(1)}"
    peer = f"{net.netns.link_prefix}q{secrets.token_hex(2)}"
    subprocess.run(["ip", "link", "add", other, "type", "veth", "peer", "name", peer], check=True)
    try:
        assert other not in net.netns.links() and peer not in net.netns.links()
        net.netns.remove_all()
        shown = subprocess.run(
            ["ip", "-o", "link", "show", other], capture_output=True, check=False
        )
        assert shown.returncode == 0  # still there
    finally:
        subprocess.run(["ip", "link", "del", other], capture_output=True, check=False)


def test_every_golden_rule_set_is_accepted_by_the_kernel(net: Net) -> None:
    """Each golden case (Istio's and the annotation ones) installs for real, replacing the
    previous one, and iptables-save then lists exactly as many ISTIO rules as were written."""
    from dataclasses import replace

    from test_platform_capture_rules import CASES, ISTIO_CASES

    from diktyo.platform.capture_apply import apply, saved
    from diktyo.platform.capture_rules import CaptureConfig, build_rules, from_annotations

    configs = [replace(CaptureConfig(), **c) for c in ISTIO_CASES.values()]  # type: ignore[arg-type]
    for case in sorted(CASES.glob("*.in.yaml")):
        from diktyo.cli.init import _annotations

        configs.append(from_annotations(_annotations(str(case))))
    for cfg in configs:
        apply(cfg, netns=net.a)
        rules = [r for r in build_rules(cfg) if r.startswith("-A ")]
        got = [r for r in saved(netns=net.a).splitlines() if r.startswith("-A ")]
        assert len(got) == len(rules), (cfg, got)
