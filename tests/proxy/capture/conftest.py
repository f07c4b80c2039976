"""Network namespaces for capture tests: two "pods" joined by a veth pair, istio-iptables-like
REDIRECT rules, and helpers to run processes inside them (as root or as the sidecar's uid 1337).

Everything is created with a unique ``dkt-t<pid>-<n>`` prefix and removed after the test
(deleting a namespace removes its veth end and its iptables rules). Tests skip with the reason
when namespaces or iptables are not available (not root, no ``ip``/``iptables``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from diktyo.snapshot.codec import encode
from diktyo.snapshot.model import Snapshot
from diktyo.testing import eventually

SIDECAR_UID = 1337
ROOT = Path(__file__).resolve().parents[3]
SYSTEM_PYTHON = "/usr/bin/python3.11"  # the venv's interpreter may sit where uid 1337 can't go
_seq = itertools.count()


def sidecar_env() -> dict[str, str]:
    site = next((ROOT / ".venv" / "lib").glob("python3*/site-packages"), None)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(site or "")])
    return env


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=30)


def capture_unavailable() -> str:
    """Why namespaces + iptables cannot be used here ("" when they can)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, iptables)"
    for tool in ("ip", "iptables", "ip6tables", "setpriv", "curl"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (Debian: iproute2 / iptables / util-linux / curl)"
    r = subprocess.run(
        ["setpriv", f"--reuid={SIDECAR_UID}", f"--regid={SIDECAR_UID}", "--clear-groups", "--",
         SYSTEM_PYTHON, "-c", "import diktyo.proxy, uvloop, httptools, msgspec"],
        env=sidecar_env(), cwd="/", capture_output=True, check=False,
    )  # fmt: skip
    if r.returncode != 0:
        return f"uid {SIDECAR_UID} cannot run {SYSTEM_PYTHON} with this tree: {r.stderr[-300:]!r}"
    name = f"dkt-probe-{os.getpid()}"
    r = _run("ip", "netns", "add", name, check=False)
    if r.returncode != 0:
        return f"cannot create a network namespace: {r.stderr.strip()}"
    try:
        r = _run("ip", "netns", "exec", name, "iptables", "-t", "nat", "-L", check=False)
        if r.returncode != 0:
            return f"iptables nat table unusable in a namespace: {r.stderr.strip()}"
    finally:
        _run("ip", "netns", "del", name, check=False)
    return ""


@dataclass
class Pod:
    ns: str
    ip: str
    procs: list[asyncio.subprocess.Process] = field(default_factory=list)

    def exec_args(self, *cmd: str, uid: int | None = None) -> list[str]:
        args = ["ip", "netns", "exec", self.ns]
        if uid is not None:
            args += ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"]
        return args + list(cmd)

    def run(
        self, *cmd: str, check: bool = True, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.exec_args(*cmd), capture_output=True, text=True,
                              check=check, timeout=timeout)  # fmt: skip

    async def arun(self, *cmd: str, input: bytes | None = None, timeout: float = 30,
                   uid: int | None = None) -> tuple[int, bytes, bytes]:  # fmt: skip
        p = await asyncio.create_subprocess_exec(
            *self.exec_args(*cmd, uid=uid),
            stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(p.communicate(input), timeout)
        return p.returncode or 0, out, err

    async def start(self, *cmd: str, uid: int | None = None,
                    env: dict[str, str] | None = None) -> asyncio.subprocess.Process:  # fmt: skip
        p = await asyncio.create_subprocess_exec(
            *self.exec_args(*cmd, uid=uid),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            cwd="/",
        )
        self.procs.append(p)
        return p

    def redirect_outbound(self, port: int = 15001) -> None:
        """istio-iptables' OUTPUT rules (IPv4 and IPv6): the sidecar (uid 1337) and loopback
        are not captured."""
        for tool, lo in (("iptables", "127.0.0.1/32"), ("ip6tables", "::1/128")):
            ipt = (tool, "-t", "nat")
            self.run(*ipt, "-N", "DKT_OUTPUT")
            self.run(*ipt, "-A", "OUTPUT", "-p", "tcp", "-j", "DKT_OUTPUT")
            self.run(*ipt, "-A", "DKT_OUTPUT", "-m", "owner", "--uid-owner", str(SIDECAR_UID),
                     "-j", "RETURN")  # fmt: skip
            self.run(*ipt, "-A", "DKT_OUTPUT", "-d", lo, "-j", "RETURN")
            self.run(*ipt, "-A", "DKT_OUTPUT", "-p", "tcp", "-j", "REDIRECT", "--to-ports",
                     str(port))  # fmt: skip

    def redirect_inbound(self, port: int = 15006) -> None:
        """istio-iptables' PREROUTING rule: every inbound TCP connection to the sidecar."""
        for tool in ("iptables", "ip6tables"):
            self.run(tool, "-t", "nat", "-A", "PREROUTING", "-p", "tcp", "-j", "REDIRECT",
                     "--to-ports", str(port))  # fmt: skip

    async def stop(self) -> None:
        for p in self.procs:
            if p.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    p.terminate()
        for p in self.procs:
            try:
                _, err = await asyncio.wait_for(p.communicate(), 10)
                if err:  # shown by pytest when the test fails
                    print(f"--- stderr of {p.pid} in {self.ns}:\n{err.decode(errors='replace')}")
            except (TimeoutError, ValueError):
                with contextlib.suppress(ProcessLookupError):
                    p.kill()


@dataclass
class Pods:
    a: Pod
    b: Pod
    tmp: Path

    async def sidecar(self, pod: Pod, snapshot: Snapshot, *args: str, timeout: float = 30,
                      env: dict[str, str] | None = None) -> dict[str, Any]:  # fmt: skip
        """Run ``diktyo sidecar --snapshot`` inside ``pod`` as uid 1337; returns its ready line
        (``admin``, ``listeners``) plus ``proc``."""
        path = self.tmp / f"snap-{pod.ns}-{next(_seq)}.json"
        path.write_bytes(encode(snapshot))
        path.chmod(0o644)
        token = self.tmp / f"admin-token-{next(_seq)}"
        p = await pod.start(SYSTEM_PYTHON, "-m", "diktyo.cli.main", "sidecar", "--snapshot",
                            str(path), "--admin-token-file", str(token), *args,
                            uid=SIDECAR_UID, env={**sidecar_env(), **(env or {})})  # fmt: skip
        assert p.stdout is not None
        line = await asyncio.wait_for(p.stdout.readline(), timeout)
        if not line:
            err = await p.stderr.read() if p.stderr else b""
            raise RuntimeError(f"sidecar in {pod.ns} exited: {err.decode(errors='replace')}")
        ready: dict[str, Any] = json.loads(line)
        ready["proc"] = p
        return ready

    async def sidecar_cp(self, pod: Pod, url: str, node_id: str, token: str,
                         timeout: float = 30) -> dict[str, Any]:  # fmt: skip
        """Run ``diktyo sidecar --control-plane URL --node ID`` in ``pod`` as uid 1337, with
        its bootstrap token in a 0600 file it owns (identity + mTLS certificate from the CA)."""
        tok = self.tmp / f"ca-token-{next(_seq)}"
        tok.write_text(token)
        os.chown(tok, SIDECAR_UID, SIDECAR_UID)
        tok.chmod(0o600)
        admin_tok = self.tmp / f"admin-token-{next(_seq)}"
        p = await pod.start(SYSTEM_PYTHON, "-m", "diktyo.cli.main", "sidecar", "--control-plane",
                            url, "--node", node_id, "--token-file", str(tok),
                            "--admin-token-file", str(admin_tok),
                            uid=SIDECAR_UID, env=sidecar_env())  # fmt: skip
        assert p.stdout is not None
        line = await asyncio.wait_for(p.stdout.readline(), timeout)
        if not line:
            err = await p.stderr.read() if p.stderr else b""
            raise RuntimeError(f"sidecar in {pod.ns} exited: {err.decode(errors='replace')}")
        ready: dict[str, Any] = json.loads(line)
        ready["proc"] = p
        return ready

    async def wait_metric(self, pod: Pod, admin: int, name: str, want: float,
                          **labels: str) -> str:  # fmt: skip
        """Scrape ``pod``'s sidecar until ``name{labels}`` reaches ``want``; the last text."""
        last = [""]

        async def reached() -> str | None:
            last[0] = text = await self.metrics(pod, admin)
            return text if metric(text, name, **labels) >= want else None

        return await eventually(
            reached, timeout=10, interval=0.1, what=lambda: f"{name}{labels} >= {want}:\n{last[0]}"
        )

    metric = staticmethod(lambda text, name, **labels: metric(text, name, **labels))

    async def metrics(self, pod: Pod, admin: int) -> str:
        rc, out, err = await pod.arun("curl", "-sS", f"http://127.0.0.1:{admin}/stats/prometheus")
        assert rc == 0, err
        return out.decode()


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith((name + "{", name + " ")):
            continue
        ok = all(f'{k}="{v}"' in line for k, v in labels.items())
        if ok:
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture
def capture_ok() -> None:
    why = capture_unavailable()
    if why:
        pytest.skip(why)


@contextlib.contextmanager
def _namespaces() -> Iterator[tuple[str, str, str]]:
    n = f"{os.getpid() % 100000}x{next(_seq)}"
    a, b = f"tcpt-{n}-a", f"tcpt-{n}-b"
    va, vb = f"tcta{n}"[:15], f"tctb{n}"[:15]
    made: list[str] = []
    hosts: list[str] = []
    try:
        for ns in (a, b):
            _run("ip", "netns", "add", ns)
            made.append(ns)
        _run("ip", "link", "add", va, "type", "veth", "peer", "name", vb)
        _run("ip", "link", "set", va, "netns", a)
        _run("ip", "link", "set", vb, "netns", b)
        # a point-to-point link from the host to each pod, for a control plane run by the test
        for ns, tag, net in ((a, "a", 8), (b, "b", 9)):
            host, pod = f"tch{tag}{n}"[:15], f"tcp{tag}{n}"[:15]
            _run("ip", "link", "add", host, "type", "veth", "peer", "name", pod)
            hosts.append(host)
            _run("ip", "link", "set", pod, "netns", ns)
            _run("ip", "addr", "add", f"10.250.{net}.1/30", "dev", host)
            _run("ip", "link", "set", host, "up")
            _run("ip", "netns", "exec", ns, "ip", "addr", "add", f"10.250.{net}.2/30", "dev", pod)
            _run("ip", "netns", "exec", ns, "ip", "link", "set", pod, "up")
            # the control plane listens on 10.250.8.1 (the host end of pod A's link)
            if net == 9:
                _run("ip", "netns", "exec", ns, "ip", "route", "add", "10.250.8.1/32", "dev", pod)
        yield a, b, f"{va}|{vb}"
    finally:
        # links first: deleting a veth end removes its peer at once, whereas a namespace is
        # destroyed asynchronously and its links could linger into the next test
        for host in hosts:
            _run("ip", "link", "del", host, check=False)
        _run("ip", "link", "del", va, check=False)  # only if it never moved
        if made:
            _run("ip", "-n", made[0], "link", "del", va, check=False)
        for ns in made:
            _run("ip", "netns", "del", ns, check=False)


@pytest.fixture
async def pods(capture_ok: None) -> AsyncIterator[Pods]:
    """Pod A (10.250.0.2, outbound captured) and pod B (10.250.0.3, inbound captured), joined by
    a veth pair; VIPs 10.250.1.0/24 route out of A (and are captured before leaving)."""
    with _namespaces() as (a, b, links), tempfile.TemporaryDirectory(prefix="dkt-cap-") as tmp:
        va, vb = links.split("|")
        os.chmod(tmp, 0o777)
        pa, pb = Pod(a, "10.250.0.2"), Pod(b, "10.250.0.3")
        for pod, dev, six in ((pa, va, "fd00:250::2"), (pb, vb, "fd00:250::3")):
            pod.run("ip", "link", "set", "lo", "up")
            pod.run("ip", "addr", "add", f"{pod.ip}/24", "dev", dev)
            pod.run("ip", "addr", "add", f"{six}/64", "dev", dev, "nodad")
            pod.run("ip", "link", "set", dev, "up")
        pa.run("ip", "route", "add", "10.250.1.0/24", "dev", va)
        pa.run("ip", "-6", "route", "add", "fd00:250:1::/64", "dev", va)
        pa.redirect_outbound()
        pb.redirect_inbound()
        pods = Pods(pa, pb, Path(tmp))
        try:
            yield pods
        finally:
            await pa.stop()
            await pb.stop()
