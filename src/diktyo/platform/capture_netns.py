"""Network namespaces for the local mesh's transparent mode: a bridge, one namespace per
workload instance with its own address, virtual service IPs, hosts files, cleanup.

Theory of operation
-------------------
``AddressPlan`` (pure) splits one private range (default ``10.209.0.0/16``) in two halves:
the lower half holds the bridge (first address, on the host side) and one address per
workload instance; the upper half holds the services' virtual IPs (like ClusterIPs), which
no interface carries. Every namespace has a single route, the range itself on its ``eth0``
(no default route), and the host holds only the bridge address: no packet from a namespace
can leave the machine, and the range exists only on the bridge diktyo made.

``Netns`` does the I/O with ``ip`` (iproute2): ``create_bridge``, ``add_namespace`` (a veth
pair: the host end on the bridge, the other end renamed ``eth0`` inside), ``write_hosts``
(``/etc/netns/<ns>/hosts``, which ``ip netns exec`` bind-mounts over ``/etc/hosts`` for the
processes it starts), and ``remove_all``, which deletes every namespace, link and hosts folder
whose name starts with the prefix: ``diktyo down`` and a ``diktyo up`` after a crash call it,
so nothing a dead supervisor made is left behind.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_CIDR = "10.209.0.0/16"
NETNS_ETC = Path("/etc/netns")
NETNS_RUN = Path("/run/netns")


class NetnsError(RuntimeError):
    """A namespace, link or address could not be made; the message has ``ip``'s words."""


def capture_unavailable_reason() -> str | None:
    """Why transparent mode cannot run here (None: it can). Needs Linux, root or
    CAP_NET_ADMIN (with CAP_SYS_ADMIN to mount namespaces), ``ip`` and ``iptables``."""
    import sys

    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux (this is {sys.platform})"
    if os.geteuid() != 0 and not _has_caps(12, 21):  # CAP_NET_ADMIN, CAP_SYS_ADMIN
        return "creating network namespaces needs root (or CAP_NET_ADMIN and CAP_SYS_ADMIN)"
    for tool, pkg in (("ip", "iproute2"), ("iptables-restore", "iptables")):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian: apt-get install {pkg})"
    return None


def probe_capture() -> str | None:
    """Why a network namespace with capture rules cannot be made here (None: it can): makes
    a throwaway namespace, installs a nat rule with the owner match in it, removes it."""
    ns = f"dkprobe-{os.getpid()}"
    rules = (
        "* nat\n:DKPROBE - [0:0]\n-A OUTPUT -p tcp -m owner --uid-owner 1337 -j DKPROBE\nCOMMIT\n"
    )
    try:
        made = _run(["ip", "netns", "add", ns], check=False)
        if made.returncode != 0:
            return f"'ip netns add' failed: {made.stderr.strip() or made.returncode}"
        restore = shutil.which("iptables-nft-restore") or shutil.which("iptables-restore")
        proc = subprocess.run(
            ["ip", "netns", "exec", ns, str(restore), "--noflush"],
            input=rules,
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            return f"iptables nat rules cannot be installed: {proc.stderr.strip()}"
        return None
    finally:
        _run(["ip", "netns", "del", ns], check=False)


def _has_caps(*caps: int) -> bool:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                eff = int(line.split()[1], 16)
                return all(eff & (1 << c) for c in caps)
    except (OSError, ValueError):
        pass
    return False


@dataclass
class AddressPlan:
    """Addresses from one private range: the bridge, instances (lower half), VIPs (upper)."""

    cidr: str = DEFAULT_CIDR
    net: ipaddress.IPv4Network = field(init=False)
    _next_pod: int = field(init=False, default=2)
    _next_vip: int = field(init=False, default=0)
    pods: dict[str, str] = field(init=False, default_factory=dict)
    vips: dict[str, str] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        try:
            net = ipaddress.ip_network(self.cidr, strict=True)
        except ValueError as exc:
            raise ValueError(
                f"network cidr {self.cidr!r} is not a network in CIDR form ({exc}); use a "
                f"private range like {DEFAULT_CIDR}"
            ) from None
        if not isinstance(net, ipaddress.IPv4Network):
            raise ValueError(f"network cidr {self.cidr!r}: only IPv4 ranges are supported")  # noqa: TRY004
        if not net.is_private or net.is_loopback or net.prefixlen > 24:
            raise ValueError(
                f"network cidr {self.cidr!r} must be a private (RFC 1918) range of /24 or "
                f"larger, like {DEFAULT_CIDR}, so nothing in it is reachable off this machine"
            )
        self.net = net

    @property
    def halves(self) -> tuple[ipaddress.IPv4Network, ipaddress.IPv4Network]:
        low, high = self.net.subnets(prefixlen_diff=1)
        return low, high

    @property
    def gateway(self) -> str:
        """The bridge's address on the host side (the control plane is reachable there)."""
        return str(self.net.network_address + 1)

    @property
    def prefixlen(self) -> int:
        return self.net.prefixlen

    def pod(self, name: str) -> str:
        """The address of workload instance ``name`` (the same on every call)."""
        if name not in self.pods:
            low = self.halves[0]
            if self._next_pod >= low.num_addresses - 1:
                raise ValueError(f"network {self.cidr} has no address left for {name}")
            self.pods[name] = str(low.network_address + self._next_pod)
            self._next_pod += 1
        return self.pods[name]

    def vip(self, service: str) -> str:
        """The virtual IP of ``service`` (an FQDN), like a ClusterIP."""
        if service not in self.vips:
            high = self.halves[1]
            if self._next_vip >= high.num_addresses - 1:
                raise ValueError(f"network {self.cidr} has no virtual IP left for {service}")
            self._next_vip += 1
            self.vips[service] = str(high.network_address + self._next_vip)
        return self.vips[service]


def hosts_file(entries: Iterable[tuple[str, Sequence[str]]], own: tuple[str, str] | None) -> str:
    """``/etc/hosts`` text: localhost, the instance's own name, then ``address names...``."""
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    if own is not None:
        lines.append(f"{own[0]}\t{own[1]}")
    lines += [f"{addr}\t{' '.join(names)}" for addr, names in entries]
    return (
        "# written by diktyo (transparent mode); removed by 'diktyo down'\n"
        + "\n".join(lines)
        + "\n"
    )


def service_names(name: str, namespace: str, cluster_domain: str = "cluster.local") -> list[str]:
    """The names a Kubernetes pod resolves for a service: short, ``name.ns``, ``name.ns.svc``,
    and the FQDN."""
    return [
        name,
        f"{name}.{namespace}",
        f"{name}.{namespace}.svc",
        f"{name}.{namespace}.svc.{cluster_domain}",
    ]


_CLONE_NEWNET = 0x40000000


def socket_in(
    ns: str, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM
) -> socket.socket:
    """A socket that belongs to network namespace ``ns`` (made there, usable from anywhere).
    The calling thread enters ``ns`` only for the ``socket()`` call (``setns`` changes the
    calling thread alone); call it from a worker thread, not the event loop's."""
    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(NETNS_RUN / ns, os.O_RDONLY)
        try:
            if libc.setns(target, _CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns into {ns}: {os.strerror(err)}")
            try:
                return socket.socket(family, kind)
            finally:
                if libc.setns(own, _CLONE_NEWNET) != 0:  # pragma: no cover - cannot happen
                    raise OSError(errno.EPERM, "could not return to the host's network namespace")
        finally:
            os.close(target)
    finally:
        os.close(own)


def _run(argv: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise NetnsError(f"'{' '.join(argv)}' failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


class Netns:
    """Namespaces and links whose names start with ``prefix`` (netns) / ``link_prefix``
    (interfaces, at most 15 characters with their suffix)."""

    def __init__(self, prefix: str = "diktyo-", link_prefix: str = "dk") -> None:
        if len(link_prefix) > 6:
            raise ValueError("link_prefix must be at most 6 characters (interface names: 15)")
        self.prefix = prefix
        self.link_prefix = link_prefix
        self.bridge = f"{link_prefix}br0"
        self._veths = 0
        # exactly the names this class gives (the bridge, veth host ends N h PID): another
        # tool's interface that merely starts with the prefix is never touched
        self._ours = re.compile(re.escape(link_prefix) + r"(?:br0|\d+[hp]\d+)")

    # ------------------------------------------------------------------ create

    def create_bridge(self, plan: AddressPlan) -> None:
        # frames between namespaces skip the host's iptables even where br_netfilter is
        # loaded (Docker hosts: FORWARD policy DROP); each namespace has its own rules
        _run(
            ["ip", "link", "add", self.bridge, "type", "bridge"]
            + ["nf_call_iptables", "0", "nf_call_ip6tables", "0", "nf_call_arptables", "0"]
        )
        _run(["ip", "addr", "add", f"{plan.gateway}/{plan.prefixlen}", "dev", self.bridge])
        _run(["ip", "link", "set", self.bridge, "up"])

    def ns_name(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def add_namespace(self, name: str, address: str, plan: AddressPlan) -> str:
        """A namespace ``prefix+name`` with ``eth0`` at ``address`` on the bridge and ``lo``
        up; returns its name. Its only route is the mesh range."""
        ns = self.ns_name(name)
        self._veths += 1
        host_end = f"{self.link_prefix}{self._veths}h{os.getpid() % 10000}"[:15]
        peer = f"{self.link_prefix}{self._veths}p{os.getpid() % 10000}"[:15]
        _run(["ip", "netns", "add", ns])
        _run(["ip", "link", "add", host_end, "type", "veth", "peer", "name", peer])
        _run(["ip", "link", "set", peer, "netns", ns])
        _run(["ip", "link", "set", host_end, "master", self.bridge])
        _run(["ip", "link", "set", host_end, "up"])
        ipns = ["ip", "-n", ns]
        _run([*ipns, "link", "set", peer, "name", "eth0"])
        _run([*ipns, "addr", "add", f"{address}/{plan.prefixlen}", "dev", "eth0"])
        _run([*ipns, "link", "set", "eth0", "up"])
        _run([*ipns, "link", "set", "lo", "up"])
        return ns

    def write_hosts(self, ns: str, text: str) -> Path:
        folder = NETNS_ETC / ns
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "hosts"
        path.write_text(text)
        path.chmod(0o644)
        return path

    @staticmethod
    def exec_argv(ns: str, argv: list[str]) -> list[str]:
        """``argv`` run inside ``ns`` (with its /etc/netns files bind-mounted over /etc)."""
        return ["ip", "netns", "exec", ns, *argv]

    # ------------------------------------------------------------------ inspect / remove

    def namespaces(self) -> list[str]:
        proc = _run(["ip", "netns", "list"], check=False)
        names = [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]
        return sorted(n for n in names if n.startswith(self.prefix))

    def links(self) -> list[str]:
        proc = _run(["ip", "-o", "link", "show"], check=False)
        out = []
        for line in proc.stdout.splitlines():
            parts = line.split(":", 2)
            if len(parts) >= 2:
                name = parts[1].strip().split("@", 1)[0]
                if self._ours.fullmatch(name):
                    out.append(name)
        return sorted(out)

    def hosts_dirs(self) -> list[Path]:
        if not NETNS_ETC.is_dir():
            return []
        return sorted(p for p in NETNS_ETC.iterdir() if p.name.startswith(self.prefix))

    def leftovers(self) -> dict[str, list[str]]:
        """What exists now under the prefixes (empty lists: nothing left behind)."""
        return {
            "namespaces": self.namespaces(),
            "links": self.links(),
            "hosts": [str(p) for p in self.hosts_dirs()],
        }

    def remove_all(self) -> dict[str, list[str]]:
        """Delete every namespace, link and /etc/netns folder under the prefixes; returns what
        was removed. Killing a namespace's processes is the caller's job (deleting a namespace
        with processes in it only unlinks its name)."""
        removed: dict[str, list[str]] = {"namespaces": [], "links": [], "hosts": []}
        for ns in self.namespaces():
            if _run(["ip", "netns", "del", ns], check=False).returncode == 0:
                removed["namespaces"].append(ns)
        for link in self.links():  # veth host ends vanish with their peers; the bridge stays
            if _run(["ip", "link", "del", link], check=False).returncode == 0:
                removed["links"].append(link)
        for path in self.hosts_dirs():
            shutil.rmtree(path, ignore_errors=True)
            removed["hosts"].append(str(path))
        return removed

    def pids_in(self, ns: str) -> list[int]:
        proc = _run(["ip", "netns", "pids", ns], check=False)
        return [int(p) for p in proc.stdout.split() if p.isdigit()]
