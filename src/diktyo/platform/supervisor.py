"""The local platform: one process hosts the control plane and supervises every sidecar and app.

Theory of operation
-------------------
``LocalMesh(spec).start()``:

1. starts the control plane in-process and registers every service of the mesh file;
2. per workload replica (``reviews-v2-1``): allocates ports (sidecar admin, outbound, one
   inbound and one app port per service port), registers its ``ProxyNode``, starts
   ``diktyo sidecar --control-plane URL --node ID --admin-port P`` and waits for it to be
   ready (its ``{"event":"ready"}`` line or admin ``/ready``); then starts the app with
   ``HTTP_PROXY`` at the outbound port and ``PORT`` at its app port, waits for the app port to
   accept connections and adds the instance (endpoint = the sidecar's inbound port) to the
   registry, health-checked through the sidecar's admin ``/ready``;
3. per ingress gateway: a sidecar in gateway mode on its host port.

When an app exits, its instance leaves the registry and its sidecar is drained and stopped.
``stop()`` goes in order: apps, then sidecars, then the control plane.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import aiohttp

from diktyo.control.model import InboundPort, ProxyNode, Service, ServicePort, WorkloadInstance
from diktyo.control.serve.cache import Translator
from diktyo.control.server import ControlPlane
from diktyo.platform.backoff import BackOff
from diktyo.platform.mesh import GatewaySpec, MeshSpec, RestartSpec, WorkloadSpec, fqdn
from diktyo.platform.ports import free_port, port_in_use
from diktyo.platform.process import Child
from diktyo.platform.state import pid_alive
from diktyo.security.admin_token import read_secret_file, write_secret
from diktyo.security.spiffe import TOKEN_FILE_ENV
from diktyo.snapshot.model import Node


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


def default_sidecar_argv(url: str, node_id: str, admin_port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "diktyo.cli.main",
        "sidecar",
        "--control-plane",
        url,
        "--node",
        node_id,
        "--admin-port",
        str(admin_port),
    ]


SidecarArgv = Callable[[str, str, int], list[str]]


def _verified(workloads: list[dict[str, Any]], container: str) -> list[int]:
    """Pids of ``container`` (app|sidecar) in state-file entries that still run as that process
    (same start time: not a reused pid)."""
    from diktyo.platform.process import same_process

    out = []
    for w in workloads:
        pid, start = w.get(f"{container}_pid"), w.get(f"{container}_start_time")
        if pid and same_process(int(pid), start):
            out.append(int(pid))
    return out


def stop_pids_of(w: dict[str, Any]) -> None:
    from diktyo.platform.process import stop_pids

    stop_pids([_verified([w], "app"), _verified([w], "sidecar")])


class MeshStartError(RuntimeError):
    """A workload could not start; the message says which and why."""


def exit_reason(code: int | None) -> dict[str, Any]:
    """How a child ended, as Kubernetes reports a terminated container.

    asyncio gives ``-N`` for a process killed by signal N; Kubernetes (and a shell) report it
    as exit code ``128 + N`` with the signal's name. ``None``: a process adopted from an
    earlier supervisor, whose exit status nobody alive can read.
    """
    if code is None:
        return {
            "exit_code": None,
            "signal": None,
            "reason": "exited (status unknown: started by an earlier supervisor)",
        }
    if code < 0:
        sig = -code
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return {
            "exit_code": 128 + sig,
            "signal": name,
            "reason": f"killed by {name}",
        }
    return {
        "exit_code": code,
        "signal": None,
        "reason": "Completed" if code == 0 else f"exited with code {code}",
    }


@dataclass
class ContainerStatus:
    """Restart count and last termination of one container (``app`` or ``sidecar``)."""

    restarts: int = 0
    last_exit: dict[str, Any] | None = None
    started: float = 0.0  # time.monotonic() of the last start
    backoff: BackOff = field(default_factory=BackOff)

    def to_json(self) -> dict[str, Any]:
        return {"restarts": self.restarts, "last_exit": self.last_exit}


@dataclass
class Replica:
    """One running copy of a workload (or a gateway): its sidecar, its app, its ports."""

    name: str  # reviews-v2-1
    workload: str  # reviews-v2
    namespace: str
    version: str
    proxy: ProxyNode
    admin_port: int
    app_ports: dict[int, int] = field(default_factory=dict)  # service port -> app port
    services: tuple[str, ...] = ()
    is_gateway: bool = False
    state: str = "pending"  # pending|starting|ready|restarting|exited|failed|stopped
    detail: str = ""
    sidecar: Child | None = None
    app: Child | None = None
    sidecar_ready: asyncio.Event = field(default_factory=asyncio.Event)
    watch: asyncio.Task[None] | None = None
    sidecar_watch: asyncio.Task[None] | None = None
    containers: dict[str, ContainerStatus] = field(default_factory=dict)  # app, sidecar
    adoptable: bool = False  # its ports were taken over from a dead supervisor's state
    address: str = "127.0.0.1"  # where its sidecar's admin port (and app) are reached
    netns: str = ""  # its network namespace (transparent capture), "" = the host's
    admin_relay: bool = False  # the supervisor relays pod address:15000 into the namespace

    def container(self, name: str) -> ContainerStatus:
        st = self.containers.get(name)
        if st is None:
            st = self.containers[name] = ContainerStatus()
        return st

    @property
    def restarts(self) -> int:
        return sum(c.restarts for c in self.containers.values())

    @property
    def last_exit(self) -> dict[str, Any] | None:
        """The latest termination of any of its containers (with ``container`` named)."""
        exits = [
            {"container": name, **c.last_exit}
            for name, c in self.containers.items()
            if c.last_exit is not None
        ]
        return max(exits, key=lambda e: e["finished_at"]) if exits else None

    @property
    def node_id(self) -> str:
        return self.proxy.node.id

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "workload": self.workload,
            "namespace": self.namespace,
            "version": self.version,
            "kind": "gateway" if self.is_gateway else "workload",
            "state": self.state,
            "detail": self.detail,
            "node": self.node_id,
            "admin_port": self.admin_port,
            "address": self.address,
            "capture": "transparent" if self.netns else "proxy",
            "netns": self.netns,
            "outbound_port": self.proxy.outbound_port,
            "inbound_ports": {str(i.service_port): i.listen_port for i in self.proxy.inbound},
            "app_ports": {str(k): v for k, v in self.app_ports.items()},
            "gateway_ports": {str(k): v for k, v in self.proxy.gateway_ports.items()},
            "sidecar_pid": self.sidecar.pid if self.sidecar else None,
            "app_pid": self.app.pid if self.app else None,
            "sidecar_start_time": self.sidecar.start_time if self.sidecar else None,
            "app_start_time": self.app.start_time if self.app else None,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            "containers": {name: c.to_json() for name, c in sorted(self.containers.items())},
        }


def _token_key(home: Path) -> bytes:
    """The key that signs sidecars' bootstrap tokens, kept in ``$DIKTYO_HOME/token-key`` (0600)."""
    path = home / "token-key"
    try:
        return bytes.fromhex(read_secret_file(path))
    except ValueError:
        if path.exists():
            raise
    key = secrets.token_bytes(32)
    write_secret(path, key.hex())
    return key


class LocalMesh:
    def __init__(
        self,
        spec: MeshSpec,
        *,
        config_dir: str | Path | None = None,
        translator: Translator | None = None,
        sidecar_argv: SidecarArgv = default_sidecar_argv,
        out: TextIO | None = None,
        ready_timeout: float = 30.0,
        on_change: Callable[[], None] | None = None,
        home: str | Path | None = None,
        mesh_file: str | Path | None = None,
        admin_token: str | None = None,
    ) -> None:
        """``home``: the folder of a mesh that outlives its supervisor (``diktyo up``): child
        output in ``home/logs``, the CA in ``home/ca``, children without a parent-death
        signal, so a killed supervisor leaves the data plane serving and a new one can
        ``adopt()`` it. Without it (tests, ``MeshThread``) children end with the supervisor."""
        self.spec = spec
        from diktyo.platform.capture_mesh import TransparentNetwork, capture_mode

        try:
            self.capture, self.capture_reason = capture_mode(spec)
        except RuntimeError as exc:
            raise MeshStartError(str(exc)) from None
        self.net = TransparentNetwork(spec) if self.capture == "transparent" else None
        self._warned_root_sidecar = False
        self.home = Path(home) if home is not None else None
        self.mesh_file = str(Path(mesh_file).resolve()) if mesh_file else None
        if self.home is not None:
            self.log_dir = self.home / "logs"
            self._own_log_dir = False
        else:
            self.log_dir = Path(tempfile.mkdtemp(prefix="diktyo-mesh-logs-"))
            self._own_log_dir = True
        self.config_dir = Path(config_dir) if config_dir else spec.config_dir()
        self.sidecar_argv = sidecar_argv
        self.out = out or sys.stdout
        self.ready_timeout = ready_timeout
        self.on_change = on_change
        from diktyo.platform.mesh import mesh_config

        self.cp = ControlPlane(
            config_dir=self.config_dir,
            translator=translator,
            mesh=mesh_config(spec),
            admin_token=admin_token,
            # a supervisor that adopts this mesh signs bootstrap tokens with the same key, so
            # the running sidecars' tokens stay valid across a control-plane restart
            token_key=_token_key(Path(home)) if home is not None else None,
        )
        from diktyo.dashboard import mount as mount_dashboard

        mount_dashboard(self.cp)  # the dashboard at the control plane's /
        # sidecars' bootstrap tokens, one 0600 file each (never in the environment, which
        # /proc/PID/environ shows); the directory goes away with the mesh
        self._token_dir = Path(tempfile.mkdtemp(prefix="diktyo-tokens-"))
        self.cp.workloads_provider = lambda: [r.to_json() for r in self.replicas]
        if self.home is not None:  # keep applied config for a supervisor that adopts the mesh
            kick = self.cp.store.on_change

            def on_store_change() -> None:
                if kick is not None:
                    kick()
                self._save_applied()

            self.cp.store.on_change = on_store_change
        self.replicas: list[Replica] = []
        self._taken: set[int] = set()  # ports handed out (never twice)
        self.state = "created"
        self.stopping = False
        self._session: aiohttp.ClientSession | None = None
        self.exited = asyncio.Event()  # set when every app has exited on its own

    # ------------------------------------------------------------------ helpers

    def _stopping_now(self) -> bool:
        """``stopping``, read afresh (an await may have let ``stop()`` set it)."""
        return self.stopping

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    @property
    def url(self) -> str:
        return self.cp.url

    def replica(self, name: str) -> Replica:
        for r in self.replicas:
            if r.name == name or r.node_id == name:
                return r
        raise KeyError(name)

    def gateway_url(self, port: int | None = None) -> str:
        for r in self.replicas:
            if r.is_gateway and r.proxy.gateway_ports:
                host_port = (
                    r.proxy.gateway_ports.get(port)
                    if port
                    else next(iter(r.proxy.gateway_ports.values()))
                )
                return f"http://127.0.0.1:{host_port}"
        raise LookupError("this mesh has no gateway")

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.spec.name,
            "pid": os.getpid(),
            "mesh_file": self.mesh_file,
            "home": str(self.home) if self.home is not None else None,
            "state": self.state,
            "control_plane": self.cp.url,
            "dashboard": self.cp.url + "/",
            "config_dir": str(self.config_dir or ""),
            "gateway": next((self.gateway_url() for r in self.replicas if r.is_gateway), None),
            "capture": self.capture,
            "network": self.spec.network.cidr if self.net is not None else None,
            "network_prefixes": (
                [self.net.netns.prefix, self.net.netns.link_prefix]
                if self.net is not None
                else None
            ),
            "workloads": [r.to_json() for r in self.replicas],
        }

    # ------------------------------------------------------------------ plan

    def _alloc(self) -> int:
        while True:
            p = free_port()
            if p not in self._taken:
                self._taken.add(p)
                return p

    def _plan(self, adopting: frozenset[int] = frozenset()) -> None:
        """Replicas and their ports. ``adopting``: gateway host ports the running gateways of
        an adopted mesh hold (not a conflict)."""
        spec = self.spec
        alloc = self._alloc

        for svc in spec.services:
            ns = spec.ns(svc)
            self.cp.registry.add_service(
                Service(
                    hostname=fqdn(svc.name, ns),
                    namespace=ns,
                    short_name=svc.name,
                    ports=tuple(ServicePort(p.port, p.name, p.protocol) for p in svc.ports),
                    addresses=(self.net.vip(fqdn(svc.name, ns)),) if self.net is not None else (),
                )
            )
        for wl in spec.workloads:
            services = spec.services_of(wl)
            sports = sorted({p.port for s in services for p in s.ports})
            for i in range(1, wl.replicas + 1):
                name = f"{wl.name}-{i}"
                ns = spec.ns(wl)
                node = Node(
                    id=f"{name}.{ns}",
                    workload=wl.name,
                    namespace=ns,
                    labels=dict(wl.labels),
                    service_account=wl.service_account,
                    services=tuple(fqdn(s.name, spec.ns(s)) for s in services),
                    mode="sidecar",
                )
                if self.net is not None:  # own namespace: the app listens on the service ports
                    self.replicas.append(self._transparent_replica(name, wl, node, sports))
                    continue
                app_ports = {sp: alloc() for sp in sports}
                proxy = ProxyNode(
                    node=node,
                    outbound_port=alloc(),
                    inbound=tuple(InboundPort(sp, alloc(), app_ports[sp]) for sp in sports),
                )
                self.replicas.append(
                    Replica(
                        name,
                        wl.name,
                        ns,
                        wl.labels.get("version", ""),
                        proxy,
                        alloc(),
                        app_ports,
                        proxy.node.services,
                    )
                )
        for gw in spec.gateways:
            ports: dict[int, int] = {}
            for gp in gw.ports:
                host = gp.host_port or alloc()
                if host not in adopting and port_in_use(host):
                    raise MeshStartError(
                        f"gateway {gw.name}: host port {host} is already in use; free it or set "
                        f"gateways[].ports[].hostPort in the mesh file (0 picks a free port)"
                    )
                ports[gp.port] = host
            proxy = ProxyNode(
                node=Node(
                    id=f"{gw.name}.{gw.namespace}",
                    workload=gw.name,
                    namespace=gw.namespace,
                    labels=dict(gw.labels),
                    service_account=gw.service_account,
                    mode="gateway",
                ),
                gateway_ports=ports,
            )
            self.replicas.append(
                Replica(gw.name, gw.name, gw.namespace, "", proxy, alloc(), is_gateway=True)
            )

    def _transparent_replica(
        self, name: str, wl: WorkloadSpec, node: Node, sports: list[int]
    ) -> Replica:
        """A replica in its own network namespace (transparent capture): the app listens on
        the service ports, the sidecar (uid 1337) on 15001/15006 and its admin port 15000."""
        import msgspec

        from diktyo.platform.capture_mesh import ADMIN_PORT

        assert self.net is not None
        node = msgspec.structs.replace(node, interception_mode="REDIRECT")  # Istio's capture
        services = [(s.name, self.spec.ns(s)) for s in self.spec.services]
        netns, address = self.net.add_instance(name, node.namespace, services, dict(wl.annotations))
        proxy = ProxyNode(node=node, inbound=tuple(InboundPort(sp, 0, sp) for sp in sports))
        rep = Replica(
            name,
            wl.name,
            node.namespace,
            wl.labels.get("version", ""),
            proxy,
            ADMIN_PORT,
            {sp: sp for sp in sports},
            node.services,
        )
        rep.address, rep.netns = address, netns
        return rep

    def _admin_url(self, rep: Replica) -> str:
        return f"http://{rep.address}:{rep.admin_port}"

    # ------------------------------------------------------------------ start

    async def start(self, host: str = "127.0.0.1") -> None:
        self.state = "starting"
        self._check_users()
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0))
        self._save_ca()
        self._save_applied()  # a new mesh starts without the applied config of an earlier one
        if self.net is not None:
            removed = await asyncio.to_thread(self.net.setup)
            if any(removed.values()):
                self.say(
                    "removed what an earlier run left behind: "
                    + "; ".join(f"{k}: {', '.join(v)}" for k, v in removed.items() if v)
                )
        await self.cp.start(host, self.spec.control_plane.port)
        if self.net is not None:
            from urllib.parse import urlsplit

            await self.net.start_forwarder(urlsplit(self.cp.url).port or 0)
            self.cp.access.allow_host(self.net.gateway)  # what sidecars send as Host
        self.say(
            f"control plane on {self.cp.url}"
            + (f" (config: {self.config_dir})" if self.config_dir else "")
        )
        self.say(
            f"capture: {self.capture} ({self.capture_reason})"
            + (
                f"; network {self.spec.network.cidr}, bridge {self.net.netns.bridge}"
                if self.net is not None
                else ""
            )
        )
        if self.cp.store.errors:
            self.say(
                "config errors (fix the files; the rest is served):\n  "
                + "\n  ".join(self.cp.store.errors)
            )
        self._plan()
        workloads = [w.name for w in self.spec.workloads] + [g.name for g in self.spec.gateways]
        total = len(workloads)
        self.say(f"starting {total} workloads ({len(self.replicas)} replicas) ...")
        self._changed()
        done = 0

        async def start_workload(wname: str) -> None:
            nonlocal done
            reps = [r for r in self.replicas if r.workload == wname]
            async with asyncio.TaskGroup() as tg:
                for r in reps:
                    tg.create_task(self._start_replica(r))
            done += 1
            self.say(f"{wname} ready ({done}/{total})")
            self._changed()

        try:
            # a failure cancels the other starts, so nothing is spawned after stop()
            async with asyncio.TaskGroup() as tg:
                for w in workloads:
                    tg.create_task(start_workload(w))
        except BaseExceptionGroup as group:
            self.state = "failed"
            errors = _leaves(group)
            first = next((e for e in errors if isinstance(e, MeshStartError)), errors[0])
            raise first from None
        except BaseException:
            self.state = "failed"
            raise
        if not await self.cp.sync(10.0):
            late = [s.node for s in self.cp.status.values() if s.state not in ("SYNCED", "NACK")]
            self.say(
                f"warning: not every sidecar acknowledged the latest config: {', '.join(late)}"
            )
        self.state = "ready"
        self._changed()

    def _check_users(self) -> None:
        users = [("sidecar", self.spec.sidecar.run_as_user, self.spec.sidecar.run_as_group)]
        users += [
            (f"workloads[{w.name}]", w.run_as_user, w.run_as_group) for w in self.spec.workloads
        ]
        for where, uid, gid in users:
            if (uid is not None or gid is not None) and os.geteuid() != 0:
                raise MeshStartError(
                    f"{where}.runAsUser/runAsGroup need diktyo to run as root (it runs as uid "
                    f"{os.geteuid()}); run 'diktyo up' as root or remove them from the mesh file"
                )

    # ------------------------------------------------------------------ adopt

    def _ca_paths(self) -> tuple[Path, Path] | None:
        if self.home is None:
            return None
        return self.home / "ca" / "root-key.pem", self.home / "ca" / "root-cert.pem"

    def _save_ca(self) -> None:
        """Keep the mesh's CA root in ``home/ca`` (key 0600): a supervisor that adopts this
        mesh signs with the same root, so running and restarted sidecars trust each other."""
        paths = self._ca_paths()
        if paths is None:
            return
        paths[0].parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.cp.identity.ca.save(str(paths[0]), str(paths[1]))

    def _load_ca(self) -> None:
        from diktyo.control.ca.authority import CertificateAuthority

        paths = self._ca_paths()
        if paths is None or not paths[0].exists():
            self.say(
                "warning: the mesh's CA was not saved; sidecars get certificates of a new root"
            )
            self._save_ca()
            return
        ca = CertificateAuthority.from_files(
            str(paths[0]), str(paths[1]), trust_domain=self.cp.identity.trust_domain
        )
        self.cp.identity.ca = ca
        self.cp.identity.service.ca = ca

    def _applied_path(self) -> Path | None:
        return self.home / "applied.yaml" if self.home is not None else None

    def _save_applied(self) -> None:
        """Write the resources applied over the API (``diktyo apply``) to ``home/applied.yaml``."""
        path = self._applied_path()
        if path is None:
            return
        docs = []
        for res in getattr(self.cp.store, "_applied", {}).values():
            dump = getattr(res.spec, "model_dump", None)
            if dump is None:
                continue
            meta: dict[str, Any] = {"name": res.name, "namespace": res.namespace}
            if res.labels:
                meta["labels"] = dict(res.labels)
            docs.append(
                {
                    "apiVersion": res.api_version,
                    "kind": res.kind,
                    "metadata": meta,
                    "spec": dump(mode="json", by_alias=True, exclude_unset=True),
                }
            )
        tmp = path.with_suffix(".tmp")
        try:
            # JSON documents are YAML: one per resource, read back with the usual loader
            tmp.write_text("".join(f"---\n{json.dumps(d, indent=1)}\n" for d in docs))
            tmp.replace(path)
        except OSError as exc:
            self.say(f"warning: cannot keep applied config in {path}: {exc}")

    def _load_applied(self) -> None:
        path = self._applied_path()
        if path is None or not path.exists():
            return
        text = path.read_text()
        if not text.strip():
            return
        keys, errors = self.cp.store.apply_text(text, str(path))
        if errors:
            self.say(
                f"warning: applied config kept in {path} not served again:\n  "
                + "\n  ".join(errors)
            )
        else:
            self.say(f"applied config served again: {len(keys)} resources from {path}")

    async def adopt(self, state: dict[str, Any], host: str = "127.0.0.1") -> None:
        """Take over a mesh whose supervisor died (``state``: its state file).

        The control plane starts again on the same port with the same CA root; the replicas the
        state file names keep their ports, and their sidecars and apps that still run (same pid
        and start time) are watched again, not restarted. What is gone is started again and
        counted as a restart; replicas the mesh file no longer has are stopped.
        """
        from urllib.parse import urlsplit

        if self.net is not None or state.get("capture", "proxy") != self.capture:
            raise MeshStartError(
                f"mesh {state.get('name')!r} ran with capture {state.get('capture', 'proxy')!r}; "
                f"this supervisor would run it with {self.capture!r} and cannot adopt it: stop "
                "it with 'diktyo down' and start it again"
            )
        self.state = "starting"
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0))
        self._load_ca()
        self._load_applied()
        port = urlsplit(str(state.get("control_plane") or "")).port or self.spec.control_plane.port
        self._taken.add(port)
        old = {str(w.get("name")): w for w in state.get("workloads", []) if isinstance(w, dict)}
        held = frozenset(
            int(v) for w in old.values() for v in (w.get("gateway_ports") or {}).values()
        )
        self._plan(adopting=held)
        for rep in self.replicas:
            w = old.pop(rep.name, None)  # what is left: replicas the mesh file no longer has
            if w is None:
                continue
            self._reuse_ports(rep, w)
            if rep.adoptable and not rep.is_gateway and pid_alive(int(w.get("app_pid") or 0)):
                # Known before the control plane listens: the running sidecars reconnect at
                # once, and a first snapshot without these endpoints would answer their
                # callers 503 UH ("no healthy upstream") until the replica is re-adopted.
                self._register_instance(rep)
        await self.cp.start(host, port)
        self.say(
            f"adopting mesh {state.get('name')!r} of supervisor pid {state.get('pid')} "
            f"(control plane again on {self.cp.url}) ..."
        )
        if old:  # replicas the mesh file no longer has
            from diktyo.platform.process import stop_pids

            gone = list(old.values())
            self.say(f"stopping replicas the mesh file no longer has: {', '.join(old)}")
            stop_pids(
                [_verified(gone, "app"), _verified(gone, "sidecar")],
                grace=5.0,
            )
        adopted = {r.name: self._state_of(state, r.name) for r in self.replicas}
        try:
            async with asyncio.TaskGroup() as tg:
                for r in self.replicas:
                    w = adopted.get(r.name)
                    tg.create_task(
                        self._adopt_replica(r, w) if w is not None else self._start_replica(r)
                    )
        except BaseExceptionGroup as group:
            self.state = "failed"
            errors = _leaves(group)
            first = next((e for e in errors if isinstance(e, MeshStartError)), errors[0])
            raise first from None
        if not await self.cp.sync(10.0):
            late = [s.node for s in self.cp.status.values() if s.state not in ("SYNCED", "NACK")]
            self.say(f"warning: not every sidecar resynchronised yet: {', '.join(late)}")
        self.state = "ready"
        self._changed()

    @staticmethod
    def _state_of(state: dict[str, Any], name: str) -> dict[str, Any] | None:
        for w in state.get("workloads", []):
            if isinstance(w, dict) and w.get("name") == name:
                return w
        return None

    def _reuse_ports(self, rep: Replica, w: dict[str, Any]) -> None:
        """The ports the replica had under the dead supervisor (its processes hold them)."""
        p = rep.proxy
        inbound_ports = {int(k): int(v) for k, v in (w.get("inbound_ports") or {}).items()}
        app_ports = {int(k): int(v) for k, v in (w.get("app_ports") or {}).items()}
        if rep.is_gateway:
            gw = {int(k): int(v) for k, v in (w.get("gateway_ports") or {}).items()}
            if set(gw) != set(p.gateway_ports):
                return  # the gateway's ports changed in the mesh file: start it anew
            rep.proxy = ProxyNode(node=p.node, address=p.address, gateway_ports=gw)
        else:
            if set(inbound_ports) != {i.service_port for i in p.inbound} or set(app_ports) != set(
                rep.app_ports
            ):
                return  # its service ports changed in the mesh file: start it anew
            rep.app_ports = app_ports
            rep.proxy = ProxyNode(
                node=p.node,
                address=p.address,
                outbound_port=int(w.get("outbound_port") or 0),
                inbound=tuple(
                    InboundPort(sp, inbound_ports[sp], app_ports[sp]) for sp in sorted(app_ports)
                ),
                local_ports=p.local_ports,
            )
        rep.admin_port = int(w.get("admin_port") or rep.admin_port)
        self._taken.update(
            [rep.admin_port, rep.proxy.outbound_port, *inbound_ports.values(), *app_ports.values()]
        )
        for name, c in (w.get("containers") or {}).items():
            st = rep.container(str(name))
            st.restarts = int(c.get("restarts") or 0)
            st.last_exit = c.get("last_exit")
        rep.adoptable = True

    async def _adopt_replica(self, rep: Replica, w: dict[str, Any]) -> None:
        if not rep.adoptable:
            self.say(f"[{rep.name}] its ports changed in the mesh file; starting it anew")
            stop_pids_of(w)
            await self._start_replica(rep)
            return
        rep.state = "starting"
        self.cp.add_proxy(rep.proxy, admin_url=self._admin_url(rep))
        sidecar = self._sidecar_child(rep)
        if sidecar.adopt(int(w.get("sidecar_pid") or 0), w.get("sidecar_start_time")):
            rep.sidecar = sidecar
            rep.container("sidecar").started = time.monotonic()
            ok = await self._wait_sidecar(rep)
        else:
            self.say(f"[{rep.name}] its sidecar is gone; starting it again")
            self._note_gone(rep, "sidecar")
            ok = await self._start_sidecar(rep)
        if not ok:
            rep.state = "failed"
            raise MeshStartError(f"{rep.name}: its sidecar did not become ready")
        rep.sidecar_watch = asyncio.get_running_loop().create_task(self._watch_sidecar(rep))
        if rep.is_gateway:
            rep.state = "ready"
            return
        app = self._child(rep.name, [])
        if app.adopt(int(w.get("app_pid") or 0), w.get("app_start_time")):
            rep.app = app
            rep.container("app").started = time.monotonic()
            if rep.app_ports and not await self._wait_app(rep):
                self.say(f"[{rep.name}] the running app does not listen on its port; restarting it")
                await app.stop()
                rep.app = None
        else:
            app_pid = w.get("app_pid")
            if app_pid:
                self.say(f"[{rep.name}] its app is gone; starting it again")
                self._note_gone(rep, "app")
        if (rep.app is None or not rep.app.running) and not await self._start_app(rep):
            rep.state = "failed"
            raise MeshStartError(f"{rep.name}: the app did not listen on its port again")
        self._register_instance(rep)
        rep.state = "ready"
        rep.watch = asyncio.get_running_loop().create_task(self._watch_app(rep))

    def _note_gone(self, rep: Replica, container: str) -> None:
        st = rep.container(container)
        st.restarts += 1
        st.last_exit = {**exit_reason(None), "finished_at": time.time()}

    def _spec_of(self, rep: Replica) -> WorkloadSpec | GatewaySpec:
        for w in self.spec.workloads:
            if w.name == rep.workload and self.spec.ns(w) == rep.namespace:
                return w
        for g in self.spec.gateways:
            if g.name == rep.workload:
                return g
        raise KeyError(rep.workload)

    async def _start_replica(self, rep: Replica) -> None:
        if self.stopping:
            return
        rep.state = "starting"
        self.cp.add_proxy(rep.proxy, admin_url=self._admin_url(rep))
        if not await self._start_sidecar(rep):
            rep.state = "failed"
            rep.detail = "sidecar did not become ready"
            raise MeshStartError(
                f"{rep.name}: its sidecar did not become ready in {self.ready_timeout:g}s "
                f"(see the '[{rep.name} sidecar]' lines above)"
            )
        rep.sidecar_watch = asyncio.get_running_loop().create_task(self._watch_sidecar(rep))
        if rep.netns and self.net is not None and not rep.admin_relay:
            # its admin port on the pod address, for health checks and scraping (unless the
            # sidecar already binds it there itself)
            rep.admin_relay = await self.net.start_admin_relay(rep.netns, rep.address)
        if rep.is_gateway:
            rep.state = "ready"
            return
        if not await self._start_app(rep):
            rep.state = "failed"
            assert rep.app is not None
            first_port = next(iter(rep.app_ports.values()), 0)
            raise MeshStartError(
                f"{rep.name}: the app did not listen on its port {first_port} (env PORT) within "
                f"{self.ready_timeout:g}s"
                + (
                    f"; it exited with code {rep.app.proc.returncode}"
                    if rep.app.proc and rep.app.proc.returncode is not None
                    else ""
                )
            )
        self._register_instance(rep)
        rep.state = "ready"
        rep.watch = asyncio.get_running_loop().create_task(self._watch_app(rep))

    async def _start_sidecar(self, rep: Replica) -> bool:
        """Start (or restart) the replica's sidecar; True once it is ready."""
        rep.sidecar_ready = asyncio.Event()
        rep.sidecar = self._sidecar_child(rep)
        await rep.sidecar.start()
        rep.container("sidecar").started = time.monotonic()
        return await self._wait_sidecar(rep)

    async def _start_app(self, rep: Replica) -> bool:
        """Start (or restart) the replica's app; True once it accepts connections on its ports."""
        wl = self._spec_of(rep)
        assert isinstance(wl, WorkloadSpec)
        env = dict(os.environ)
        first_port = next(iter(rep.app_ports.values()), 0)
        if not rep.netns:  # transparent capture needs no proxy settings
            proxy_url = f"http://127.0.0.1:{rep.proxy.outbound_port}"
            env.update(
                {
                    "HTTP_PROXY": proxy_url,
                    "http_proxy": proxy_url,
                    "NO_PROXY": "localhost,127.0.0.1",
                    "no_proxy": "localhost,127.0.0.1",
                }
            )
        else:
            for k in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "NO_PROXY"):
                env.pop(k, None)
        env.update(
            {
                "PORT": str(first_port),
                "SERVICE_NAME": rep.services[0].split(".")[0] if rep.services else rep.workload,
                "SERVICE_VERSION": rep.version,
                "POD_NAME": rep.name,
                "POD_NAMESPACE": rep.namespace,
                "WORKLOAD_NAME": rep.workload,
                "PYTHONUNBUFFERED": "1",
            }
        )
        for sp, ap in rep.app_ports.items():
            env[f"PORT_{sp}"] = str(ap)
        env.update(wl.env)
        cwd = (
            str((Path(self.spec.base_dir) / wl.working_dir).resolve())
            if wl.working_dir
            else self.spec.base_dir
        )
        argv = [a.replace("{python}", sys.executable) for a in wl.argv]
        user, group = wl.run_as_user, wl.run_as_group
        if rep.netns and self.net is not None:  # 'ip netns exec' runs as root, then setpriv
            argv = self.net.wrap(rep.netns, argv, user, group)
            user = group = None
        rep.app = self._child(rep.name, argv, env=env, cwd=cwd, user=user, group=group)
        await rep.app.start()
        rep.container("app").started = time.monotonic()
        return not rep.app_ports or await self._wait_app(rep)

    def _register_instance(self, rep: Replica) -> None:
        if not rep.services:
            return
        self.cp.registry.add_instance(
            WorkloadInstance(
                name=rep.name,
                workload=rep.workload,
                address=rep.address,
                # transparent: the app's own port (the peer's inbound capture takes it)
                ports={
                    i.service_port: i.app_port if rep.netns else i.listen_port
                    for i in rep.proxy.inbound
                },
                services=rep.services,
                namespace=rep.namespace,
                labels=dict(rep.proxy.node.labels),
                service_account=rep.proxy.node.service_account,
                has_sidecar=True,
            ),
            admin_url=self._admin_url(rep),
        )

    def _reallocate_listeners(self, rep: Replica) -> None:
        """New outbound/inbound listener ports (another process took one since we picked it)."""
        p = rep.proxy
        inbound = tuple(InboundPort(i.service_port, self._alloc(), i.app_port) for i in p.inbound)
        outbound = self._alloc() if p.outbound_port else 0
        rep.proxy = ProxyNode(
            node=p.node,
            address=p.address,
            outbound_port=outbound,
            inbound=inbound,
            local_ports=p.local_ports,
            gateway_ports=p.gateway_ports,
        )
        self.cp.add_proxy(rep.proxy, admin_url=self._admin_url(rep))

    def _proxy_env(self, rep: Replica) -> dict[str, str]:
        """Istio's ``concurrency`` for the replica's sidecar, with Istio's precedence (lowest
        first): the mesh's ``sidecar.concurrency`` (meshConfig.defaultConfig), a ProxyConfig
        in ``istio-system`` (mesh-wide), one in the workload's namespace, the workload's
        ``proxy.istio.io/config`` annotation, a ProxyConfig selecting the workload. Unset
        everywhere: the sidecar's default (1). Read when the sidecar starts: like Istio, a
        change applies on restart."""
        from diktyo.api.proxy_config import concurrency_levels
        from diktyo.core.proxy_config import MAX_CONCURRENCY, annotation_concurrency

        annotated = None
        for wl in self.spec.workloads if not rep.is_gateway else []:
            if wl.name == rep.workload and (wl.namespace or self.spec.namespace) == rep.namespace:
                annotated = annotation_concurrency(wl.annotations) if wl.annotations else None
        labels = dict(rep.proxy.node.labels) if rep.proxy is not None else {}
        workload, namespace, mesh = concurrency_levels(
            self.cp.store.resources, rep.namespace, labels
        )
        n = self.spec.sidecar.concurrency
        for level in (mesh, namespace, annotated, workload):
            n = n if level is None else min(level, MAX_CONCURRENCY)
        return {} if n is None else {"DIKTYO_CONCURRENCY": str(n)}

    def _identity_env(
        self, rep: Replica, uid: int | None = None, gid: int | None = None
    ) -> dict[str, str]:
        """The sidecar's bootstrap token (its SPIFFE id is inside): it fetches its cert with it."""
        node = rep.proxy.node
        token = self.cp.identity.token_for(node.namespace, node.service_account)
        path = self._token_dir / f"{rep.node_id}.token"
        write_secret(path, token)
        if uid is None:
            uid, gid = self.spec.sidecar.run_as_user, self.spec.sidecar.run_as_group
        if uid is not None:  # the sidecar's own uid reads it; the folder only lets it through
            os.chown(path, uid, gid if gid is not None else -1)
            self._token_dir.chmod(0o711)
        return {TOKEN_FILE_ENV: str(path)}  # a path, not the secret

    def _sidecar_child(self, rep: Replica) -> Child:
        def on_sidecar_line(line: str) -> bool:
            if line.startswith("{") and '"ready"' in line:
                with contextlib.suppress(ValueError):
                    if json.loads(line).get("event") == "ready":
                        rep.sidecar_ready.set()
                        return True
            return False

        if rep.netns and self.net is not None:
            return self._transparent_sidecar_child(rep, on_sidecar_line)
        return self._child(
            f"{rep.name} sidecar",
            self.sidecar_argv(self.cp.url, rep.node_id, rep.admin_port),
            env={**os.environ, "PYTHONUNBUFFERED": "1", **self._identity_env(rep),
                 **self._proxy_env(rep)},
            on_line=on_sidecar_line,
            user=self.spec.sidecar.run_as_user,
            group=self.spec.sidecar.run_as_group,
            # its own uid may not read the supervisor's folder
            cwd="/" if self.spec.sidecar.run_as_user is not None else None,
        )

    def _transparent_sidecar_child(self, rep: Replica, on_line: Callable[[str], bool]) -> Child:
        """The sidecar in the replica's namespace as uid/gid 1337 (what the capture rules
        leave alone), talking to the control plane through the bridge address."""
        from urllib.parse import urlsplit

        from diktyo.platform.capture_mesh import SIDECAR_UID

        assert self.net is not None
        uid = self.spec.sidecar.run_as_user
        uid = SIDECAR_UID if uid is None else uid
        gid = self.spec.sidecar.run_as_group
        gid = uid if gid is None else gid
        python, extra, run_uid = self.net.sidecar_runtime(rep.netns, uid, gid)
        if run_uid is None and not self._warned_root_sidecar:
            self._warned_root_sidecar = True
            self.say(
                f"warning: uid {uid} cannot run this Python ({python}); sidecars run as root "
                f"with gid {gid}, which the capture rules exclude (install python3 for all "
                "users, or set sidecar.runAsUser to a uid that can read the venv)"
            )
        env = {
            **os.environ,
            **extra,
            "PYTHONUNBUFFERED": "1",
            "DIKTYO_INTERCEPTION_MODE": "REDIRECT",
            "DIKTYO_ADMIN_ADDRESS": "0.0.0.0",  # the supervisor reaches it on the pod address
            **self._identity_env(rep, uid, gid),
            **self._proxy_env(rep),
        }
        # its admin token where its own uid can read it (not under the supervisor's home)
        admin_token = self._token_dir / f"{rep.node_id}.admin-token"
        if not admin_token.exists():
            write_secret(admin_token, secrets.token_urlsafe(32))
        os.chown(admin_token, run_uid if run_uid is not None else 0, gid)
        env["DIKTYO_ADMIN_TOKEN_FILE"] = str(admin_token)
        cp_url = f"http://{self.net.gateway}:{urlsplit(self.cp.url).port}"
        argv = self.sidecar_argv(cp_url, rep.node_id, rep.admin_port)
        if argv and argv[0] == sys.executable:
            argv = [python, *argv[1:]]
        return self._child(
            f"{rep.name} sidecar",
            self.net.wrap(rep.netns, argv, run_uid, gid),
            env=env,
            on_line=on_line,
            cwd="/",
        )

    def _child(self, label: str, argv: list[str], **kwargs: Any) -> Child:
        return Child(
            label,
            argv,
            out=self.out,
            log_dir=self.log_dir,
            die_with_parent=self.home is None,
            **kwargs,
        )

    async def _wait_sidecar(self, rep: Replica) -> bool:
        assert rep.sidecar is not None and self._session is not None
        deadline = time.monotonic() + self.ready_timeout
        retries = 3
        handled = ""  # the NACKed version already answered with new ports
        while time.monotonic() < deadline:
            url = f"{self._admin_url(rep)}/ready"
            if rep.sidecar_ready.is_set():
                return True
            st = self.cp.status.get(rep.node_id)
            if st is not None and st.state == "NACK" and "bind" in st.error and retries:
                if st.nacked == handled:
                    await asyncio.sleep(0.05)
                    continue
                # a picked port was taken meanwhile: pick new ones and push them
                handled = st.nacked
                retries -= 1
                self.say(f"[{rep.name}] {st.error}; picking new listener ports")
                self._reallocate_listeners(rep)
            if not rep.sidecar.running:
                if not retries:
                    return False
                retries -= 1  # e.g. its admin port was taken meanwhile: start it again
                self.say(f"[{rep.name}] sidecar exited before it was ready; starting it again")
                if self.net is None:  # in its own namespace its admin port stays 15000
                    rep.admin_port = self._alloc()
                self.cp.add_proxy(rep.proxy, admin_url=self._admin_url(rep))
                rep.sidecar = self._sidecar_child(rep)
                await rep.sidecar.start()
                continue
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
                async with self._session.get(url) as resp:
                    if resp.status == 200:
                        return True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(rep.sidecar_ready.wait(), 0.1)
        return False

    async def _wait_app(self, rep: Replica) -> bool:
        assert rep.app is not None
        deadline = time.monotonic() + self.ready_timeout
        ports = list(rep.app_ports.values())
        while time.monotonic() < deadline:
            if not rep.app.running:
                return False
            if rep.netns:  # a connection from here would be captured: ask its namespace
                pid = rep.app.pid
                if pid is not None and self.net is not None and self.net.listening(pid, ports):
                    return True
                await asyncio.sleep(0.05)
                continue
            ok = True
            for p in ports:
                try:
                    _, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", p), 0.5)
                    w.close()
                except (OSError, TimeoutError):
                    ok = False
                    break
            if ok:
                return True
            await asyncio.sleep(0.05)
        return False

    @property
    def restart_spec(self) -> RestartSpec:
        return self.spec.restart

    def _should_restart(self, container: str, code: int | None) -> bool:
        policy = self.restart_spec.policy
        if policy == "Never":
            return False
        # OnFailure leaves an app that completed (exit 0) alone; sidecars are restarted unless
        # the policy is Never, as Kubernetes' native sidecars are
        return not (policy == "OnFailure" and code == 0 and container == "app")

    def _record_exit(
        self, rep: Replica, container: str, code: int | None
    ) -> tuple[ContainerStatus, float]:
        """Note the exit; the back-off delay before the restart (Kubernetes' CrashLoopBackOff)."""
        st = rep.container(container)
        spec = self.restart_spec
        st.backoff.base, st.backoff.cap = spec.backoff_base, spec.backoff_max
        st.backoff.reset_after = spec.reset_after
        st.last_exit = {**exit_reason(code), "finished_at": time.time()}
        ran_for = time.monotonic() - st.started if st.started else 0.0
        return st, st.backoff.next_delay(ran_for)

    async def _watch_app(self, rep: Replica) -> None:
        """Wait for the app to exit; restart it with back-off (or drain the replica)."""
        while True:
            assert rep.app is not None
            code = await rep.app.wait()
            if self.stopping:
                return
            st, delay = self._record_exit(rep, "app", code)
            why = st.last_exit["reason"] if st.last_exit else f"exited with code {code}"
            self.cp.registry.remove_instance(rep.name)
            if not self._should_restart("app", code):
                rep.state = "exited"
                rep.detail = f"app {why}"
                self.say(f"[{rep.name}] {why} (exit code {code}); draining its sidecar")
                self._changed()
                if rep.sidecar is not None:
                    await rep.sidecar.stop()
                self.cp.remove_proxy(rep.node_id)
                if all(r.state in ("exited", "failed") for r in self.replicas if not r.is_gateway):
                    self.exited.set()
                return
            while True:  # restart until it listens again (each failed start is one more exit)
                rep.state = "restarting"
                rep.detail = f"app {why}; back-off {delay:g}s" if delay else f"app {why}"
                self.say(
                    f"[{rep.name}] app {why}; restarting it"
                    + (f" in {delay:g}s (back-off)" if delay else "")
                    + f" (restart {st.restarts + 1})"
                )
                self._changed()
                if delay:
                    await asyncio.sleep(delay)
                if self._stopping_now():  # set by stop() while we awaited
                    return
                st.restarts += 1
                if await self._start_app(rep):
                    break
                assert rep.app is not None
                if rep.app.running:  # started but does not listen: stop it, count as a crash
                    await rep.app.stop()
                if self._stopping_now():  # set by stop() while we awaited
                    return
                st, delay = self._record_exit(rep, "app", rep.app.returncode)
                why = st.last_exit["reason"] if st.last_exit else "did not listen"
            self._register_instance(rep)
            rep.state = "ready" if rep.sidecar is not None and rep.sidecar.running else rep.state
            rep.detail = ""
            self.say(f"[{rep.name}] app restarted and listening")
            self._changed()

    async def _watch_sidecar(self, rep: Replica) -> None:
        """Wait for the sidecar to exit; restart it with back-off on the same ports."""
        while True:
            assert rep.sidecar is not None
            code = await rep.sidecar.wait()
            if self.stopping or rep.state == "exited":
                return
            st, delay = self._record_exit(rep, "sidecar", code)
            why = st.last_exit["reason"] if st.last_exit else f"exited with code {code}"
            if not self._should_restart("sidecar", code):
                rep.state = "failed"
                rep.detail = f"sidecar {why}"
                self.say(
                    f"[{rep.name}] sidecar exited with code {code}; health checks take the "
                    "instance out of every endpoint list"
                )
                self._changed()
                return
            # like the kubelet setting a pod un-Ready when a container dies: out of the endpoints
            # now, not after two failed health checks
            self.cp.registry.set_healthy(rep.name, False)
            while True:
                rep.state = "restarting"
                rep.detail = f"sidecar {why}; back-off {delay:g}s" if delay else f"sidecar {why}"
                self.say(
                    f"[{rep.name}] sidecar {why} (exit code {code}); its instance leaves every "
                    "endpoint list until it is ready again; restarting it"
                    + (f" in {delay:g}s (back-off)" if delay else "")
                    + f" (restart {st.restarts + 1})"
                )
                self._changed()
                if delay:
                    await asyncio.sleep(delay)
                if self._stopping_now():  # set by stop() while we awaited
                    return
                st.restarts += 1
                if await self._start_sidecar(rep):
                    break
                if rep.sidecar is not None and rep.sidecar.running:
                    await rep.sidecar.stop()
                if self._stopping_now():  # set by stop() while we awaited
                    return
                assert rep.sidecar is not None
                code = rep.sidecar.returncode
                st, delay = self._record_exit(rep, "sidecar", code)
                why = st.last_exit["reason"] if st.last_exit else "did not become ready"
            # ready again: back in the endpoints at once; a probe that failed while it was down
            # must not take it out again
            self.cp.health.forget(rep.name)
            self.cp.registry.set_healthy(rep.name, True)
            app_up = rep.is_gateway or (rep.app is not None and rep.app.running)
            if app_up and rep.state == "restarting" and rep.detail.startswith("sidecar"):
                rep.state = "ready"
                rep.detail = ""
            self.say(f"[{rep.name}] sidecar restarted and ready")
            self._changed()

    # ------------------------------------------------------------------ stop

    async def stop(self) -> None:
        """Apps first, then sidecars, then the control plane. Safe to call twice."""
        if self.stopping and self.state == "stopped":
            return
        self.stopping = True
        self.state = "stopping"
        self._changed()
        for r in self.replicas:  # no restart may start a process from here on
            for task in (r.watch, r.sidecar_watch):
                if task is not None and not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
        apps = [r for r in self.replicas if r.app is not None]
        for r in apps:
            self.cp.registry.remove_instance(r.name)
        await asyncio.gather(*(r.app.stop() for r in apps if r.app is not None))
        await asyncio.gather(*(r.sidecar.stop() for r in self.replicas if r.sidecar is not None))
        for r in self.replicas:
            if r.state != "failed":
                r.state = "stopped"
        await self.cp.stop()
        if self.net is not None:  # namespaces, links, hosts files: nothing left behind
            await self.net.close()
        shutil.rmtree(self._token_dir, ignore_errors=True)
        if self._session is not None:
            await self._session.close()
        if self._own_log_dir:
            shutil.rmtree(self.log_dir, ignore_errors=True)
        self.state = "stopped"
        self._changed()

    def pids(self) -> list[int]:
        out = []
        for r in self.replicas:
            for c in (r.sidecar, r.app):
                if c is not None and c.pid is not None:
                    out.append(c.pid)
        return out
