"""The local mesh's transparent mode: what ``LocalMesh`` asks of the network when the mesh
file says ``capture: transparent``.

Theory of operation
-------------------
``TransparentNetwork(spec)`` owns the bridge and the namespaces (``capture_netns``) and the
capture rules (``capture_rules``) of one mesh:

* ``setup()`` removes what a crashed earlier run left under the same prefixes, then makes the
  bridge; ``start_forwarder(port)`` makes the control plane reachable from the namespaces at
  ``http://<bridge address>:<port>`` (it listens on 127.0.0.1 only; a relay on the bridge
  address forwards to it, so nothing listens on an address off the machine);
* ``add_instance(replica, namespace, services)`` makes the instance's namespace and address,
  its hosts file (every service's names -> its VIP) and installs Istio's redirect rules in it
  (15001 / 15006, uid/gid 1337 excluded, the admin port 15000 not captured inbound);
* ``wrap(ns, argv, uid, gid)`` is the argv that runs a process inside the namespace, under
  another uid (``ip netns exec`` must run as root, so ``setpriv`` drops privileges after it);
* ``listening(pid, ports)`` tells whether a process's namespace has those TCP ports listening
  (``/proc/PID/net/tcp``): an app's readiness cannot be checked by connecting from outside,
  because inbound capture would send the connection to its sidecar;
* ``close()`` stops the relay and removes every namespace, link and hosts file.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from diktyo.platform.capture_apply import apply as apply_rules
from diktyo.platform.capture_netns import (
    AddressPlan,
    Netns,
    capture_unavailable_reason,
    hosts_file,
    probe_capture,
    service_names,
    socket_in,
)
from diktyo.platform.capture_rules import (
    DEFAULT_EXCLUDE_INBOUND_PORTS,
    CaptureConfig,
    from_annotations,
)

if TYPE_CHECKING:
    from diktyo.platform.mesh import MeshSpec

SIDECAR_UID = 1337  # Istio's istio-proxy uid/gid: excluded from capture
ADMIN_PORT = 15000  # the sidecar's admin port inside a namespace (not captured inbound)


def capture_mode(spec: MeshSpec) -> tuple[str, str]:
    """(``transparent`` | ``proxy``, why) for the mesh file's ``capture`` setting; ``auto``
    (the default) picks transparent when this machine can make network namespaces. A mesh
    file without ``capture:`` takes ``$DIKTYO_CAPTURE`` when it is set."""
    wanted, source = spec.capture, "the mesh file"
    env = os.environ.get("DIKTYO_CAPTURE", "").strip().lower()
    if "capture" not in spec.model_fields_set and env:
        if env not in ("proxy", "transparent", "auto"):
            raise RuntimeError(f"DIKTYO_CAPTURE={env!r}: use proxy, transparent or auto")
        wanted, source = env, "$DIKTYO_CAPTURE"
    elif "capture" not in spec.model_fields_set:
        source = "the default"
    if wanted == "proxy":
        return "proxy", f"capture: proxy ({source})"
    reason = capture_unavailable_reason()
    if reason is None and wanted == "auto":
        reason = probe_capture()  # root may still lack namespaces or the nat table
    if reason is None:
        return "transparent", f"capture: {wanted} ({source})"
    if wanted == "transparent":
        raise RuntimeError(
            f"capture: transparent is not possible here: {reason}; set 'capture: proxy' (apps "
            "then use HTTP_PROXY) or 'capture: auto'"
        )
    return "proxy", f"transparent capture unavailable ({reason}); apps use HTTP_PROXY"


async def _pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    try:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            w.close()


def _listening_ports(pid: int) -> set[int]:
    ports: set[int] = set()
    for name in ("tcp", "tcp6"):
        try:
            text = Path(f"/proc/{pid}/net/{name}").read_text()
        except OSError:
            continue
        for line in text.splitlines()[1:]:
            parts = line.split()
            if len(parts) > 3 and parts[3] == "0A":  # TCP_LISTEN
                ports.add(int(parts[1].rsplit(":", 1)[1], 16))
    return ports


class TransparentNetwork:
    def __init__(self, spec: MeshSpec) -> None:
        net = spec.network
        self.plan = AddressPlan(net.cidr)
        self.netns = Netns(prefix=net.name_prefix, link_prefix=net.link_prefix)
        self.rules = CaptureConfig.injected(
            inbound_ports_exclude=f"{DEFAULT_EXCLUDE_INBOUND_PORTS},{ADMIN_PORT}"
        )
        self._server: asyncio.Server | None = None
        self._relays: set[asyncio.Task[None]] = set()
        self.namespaces: dict[str, str] = {}  # replica name -> netns
        self.setpriv = shutil.which("setpriv") or "setpriv"
        self._runtime: tuple[str, dict[str, str], int | None] | None = None
        self._admin_servers: list[asyncio.Server] = []

    @property
    def gateway(self) -> str:
        return self.plan.gateway

    def setup(self) -> dict[str, list[str]]:
        """Remove a crashed run's leftovers, then make the bridge; returns what was removed."""
        removed = self.netns.remove_all()
        self.netns.create_bridge(self.plan)
        return removed

    def vip(self, fqdn: str) -> str:
        return self.plan.vip(fqdn)

    def add_instance(
        self,
        replica: str,
        namespace: str,
        services: list[tuple[str, str]],
        annotations: dict[str, str] | None = None,
    ) -> tuple[str, str]:
        """Namespace, address, hosts file and capture rules of one instance; ``services``:
        (name, namespace) of every service of the mesh; ``annotations``: the workload's pod
        annotations (``traffic.sidecar.istio.io/*`` change its rules). Returns (netns,
        address)."""
        address = self.plan.pod(f"{replica}.{namespace}")
        ns = self.netns.add_namespace(f"{namespace}-{replica}", address, self.plan)
        self.namespaces[replica] = ns
        entries = []
        for name, svc_ns in services:
            names = service_names(name, svc_ns)
            if svc_ns != namespace:
                names = names[1:]  # the short name resolves in its own namespace only
            entries.append((self.vip(f"{name}.{svc_ns}.svc.cluster.local"), names))
        self.netns.write_hosts(ns, hosts_file(entries, (address, replica)))
        rules = from_annotations(annotations, self.rules) if annotations else self.rules
        apply_rules(rules, netns=ns)
        return ns, address

    def wrap(self, ns: str, argv: list[str], uid: int | None, gid: int | None) -> list[str]:
        inner = argv
        if uid is not None or gid is not None:
            priv = [self.setpriv]
            if uid is not None:
                priv.append(f"--reuid={uid}")
            if gid is not None or uid is not None:
                priv.append(f"--regid={gid if gid is not None else uid}")
            inner = [*priv, "--clear-groups", "--", *argv]
        return Netns.exec_argv(ns, inner)

    def sidecar_runtime(
        self, ns: str, uid: int, gid: int
    ) -> tuple[str, dict[str, str], int | None]:
        """(python, extra env, uid) that runs the sidecar as ``uid`` inside a namespace.

        The venv's interpreter may sit where another uid cannot read (a pyenv under /root):
        then the system Python of the same version with the venv's packages on PYTHONPATH.
        If neither imports diktyo as ``uid``, the sidecar runs as root with gid ``gid``:
        istio-iptables' gid rule still leaves its traffic alone (the caller warns)."""
        if self._runtime is not None:
            return self._runtime
        site = [p for p in sys.path if p.endswith("site-packages")]
        import diktyo

        src = os.path.dirname(os.path.dirname(os.path.abspath(diktyo.__file__)))
        system = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
        candidates: list[tuple[str, dict[str, str]]] = [(sys.executable, {})]
        if os.path.exists(system):
            candidates.append((system, {"PYTHONPATH": os.pathsep.join([src, *site])}))
        # as the sidecar starts: imports, then it re-executes itself (python -m diktyo.proxy)
        probe = (
            "import os, sys, diktyo.proxy, uvloop, httptools, msgspec, encodings.idna; "
            "os.execv(sys.executable, [sys.executable, '-c', 'import diktyo.proxy'])"
        )
        for python, env in candidates:
            argv = self.wrap(ns, [python, "-c", probe], uid, gid)
            r = subprocess.run(
                argv, env={**os.environ, **env}, cwd="/", capture_output=True, check=False
            )
            if r.returncode == 0:
                self._runtime = (python, env, uid)
                return self._runtime
        self._runtime = (sys.executable, {}, None)
        return self._runtime

    @staticmethod
    def listening(pid: int, ports: list[int]) -> bool:
        return set(ports) <= _listening_ports(pid)

    # ------------------------------------------------------------------ relays

    async def start_admin_relay(self, ns: str, address: str, port: int = ADMIN_PORT) -> bool:
        """Make the sidecar's admin port (on 127.0.0.1 inside ``ns``) reachable from the host
        at ``address:port``: a listening socket made inside the namespace, each connection
        relayed to 127.0.0.1:port there. False when the address is taken (the sidecar binds
        its admin port on every address itself, ``DIKTYO_ADMIN_ADDRESS=0.0.0.0``)."""
        lsock = await asyncio.to_thread(socket_in, ns)
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            lsock.bind((address, port))
        except OSError:
            lsock.close()
            return False
        lsock.listen(64)
        lsock.setblocking(False)

        async def relay(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            if task is not None:
                self._relays.add(task)
            try:
                up = await asyncio.to_thread(socket_in, ns)
                up.setblocking(False)
                try:
                    await asyncio.get_running_loop().sock_connect(up, ("127.0.0.1", port))
                except OSError:
                    up.close()
                    w.close()
                    return
                ur, uw = await asyncio.open_connection(sock=up)
                await asyncio.gather(_pipe(r, uw), _pipe(ur, w))
            finally:
                if task is not None:
                    self._relays.discard(task)

        self._admin_servers.append(await asyncio.start_server(relay, sock=lsock))
        return True

    async def start_forwarder(self, port: int) -> None:
        """Relay ``<bridge address>:port`` to the control plane on ``127.0.0.1:port``."""

        async def relay(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            if task is not None:
                self._relays.add(task)
            try:
                ur, uw = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                w.close()
                return
            try:
                await asyncio.gather(_pipe(r, uw), _pipe(ur, w))
            finally:
                if task is not None:
                    self._relays.discard(task)

        self._server = await asyncio.start_server(relay, self.gateway, port)

    async def close(self) -> dict[str, list[str]]:
        servers = [*self._admin_servers, *([self._server] if self._server is not None else [])]
        for srv in servers:
            srv.close()
        for t in list(self._relays):
            t.cancel()
        for srv in servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(srv.wait_closed(), 2)
        self._server = None
        self._admin_servers = []
        return await asyncio.to_thread(self.netns.remove_all)
