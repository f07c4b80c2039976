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
import shutil
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
from diktyo.platform.mesh import GatewaySpec, MeshSpec, WorkloadSpec, fqdn
from diktyo.platform.ports import free_port, port_in_use
from diktyo.platform.process import Child
from diktyo.security.admin_token import write_secret
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


class MeshStartError(RuntimeError):
    """A workload could not start; the message says which and why."""


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
    state: str = "pending"  # pending|starting|ready|exited|failed|stopped
    detail: str = ""
    sidecar: Child | None = None
    app: Child | None = None
    sidecar_ready: asyncio.Event = field(default_factory=asyncio.Event)
    watch: asyncio.Task[None] | None = None
    sidecar_watch: asyncio.Task[None] | None = None

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
            "outbound_port": self.proxy.outbound_port,
            "inbound_ports": {str(i.service_port): i.listen_port for i in self.proxy.inbound},
            "app_ports": {str(k): v for k, v in self.app_ports.items()},
            "gateway_ports": {str(k): v for k, v in self.proxy.gateway_ports.items()},
            "sidecar_pid": self.sidecar.pid if self.sidecar else None,
            "app_pid": self.app.pid if self.app else None,
        }


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
        admin_token: str | None = None,
    ) -> None:
        self.spec = spec
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
        )
        # sidecars' bootstrap tokens, one 0600 file each (never in the environment, which
        # /proc/PID/environ shows); the directory goes away with the mesh
        self._token_dir = Path(tempfile.mkdtemp(prefix="diktyo-tokens-"))
        self.cp.workloads_provider = lambda: [r.to_json() for r in self.replicas]
        self.replicas: list[Replica] = []
        self._taken: set[int] = set()  # ports handed out (never twice)
        self.state = "created"
        self.stopping = False
        self._session: aiohttp.ClientSession | None = None
        self.exited = asyncio.Event()  # set when every app has exited on its own

    # ------------------------------------------------------------------ helpers

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
            "state": self.state,
            "control_plane": self.cp.url,
            "dashboard": self.cp.url + "/",
            "config_dir": str(self.config_dir or ""),
            "gateway": next((self.gateway_url() for r in self.replicas if r.is_gateway), None),
            "workloads": [r.to_json() for r in self.replicas],
        }

    # ------------------------------------------------------------------ plan

    def _alloc(self) -> int:
        while True:
            p = free_port()
            if p not in self._taken:
                self._taken.add(p)
                return p

    def _plan(self) -> None:
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
                )
            )
        for wl in spec.workloads:
            services = spec.services_of(wl)
            sports = sorted({p.port for s in services for p in s.ports})
            for i in range(1, wl.replicas + 1):
                name = f"{wl.name}-{i}"
                ns = spec.ns(wl)
                app_ports = {sp: alloc() for sp in sports}
                proxy = ProxyNode(
                    node=Node(
                        id=f"{name}.{ns}",
                        workload=wl.name,
                        namespace=ns,
                        labels=dict(wl.labels),
                        service_account=wl.service_account,
                        services=tuple(fqdn(s.name, spec.ns(s)) for s in services),
                        mode="sidecar",
                    ),
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
                if port_in_use(host):
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

    # ------------------------------------------------------------------ start

    async def start(self, host: str = "127.0.0.1") -> None:
        self.state = "starting"
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0))
        await self.cp.start(host, self.spec.control_plane.port)
        self.say(
            f"control plane on {self.cp.url}"
            + (f" (config: {self.config_dir})" if self.config_dir else "")
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
        self.cp.add_proxy(rep.proxy, admin_url=f"http://127.0.0.1:{rep.admin_port}")

        rep.sidecar = self._sidecar_child(rep)
        await rep.sidecar.start()
        if not await self._wait_sidecar(rep):
            rep.state = "failed"
            rep.detail = "sidecar did not become ready"
            raise MeshStartError(
                f"{rep.name}: its sidecar did not become ready in {self.ready_timeout:g}s "
                f"(see the '[{rep.name} sidecar]' lines above)"
            )
        rep.sidecar_watch = asyncio.get_running_loop().create_task(self._watch_sidecar(rep))
        if rep.is_gateway:
            rep.state = "ready"
            return
        wl = self._spec_of(rep)
        assert isinstance(wl, WorkloadSpec)
        env = dict(os.environ)
        proxy_url = f"http://127.0.0.1:{rep.proxy.outbound_port}"
        first_port = next(iter(rep.app_ports.values()), 0)
        env.update(
            {
                "HTTP_PROXY": proxy_url,
                "http_proxy": proxy_url,
                "NO_PROXY": "localhost,127.0.0.1",
                "no_proxy": "localhost,127.0.0.1",
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
        rep.app = Child(rep.name, argv, env=env, cwd=cwd, out=self.out)
        await rep.app.start()
        if rep.app_ports and not await self._wait_app(rep):
            rep.state = "failed"
            raise MeshStartError(
                f"{rep.name}: the app did not listen on its port {first_port} (env PORT) within "
                f"{self.ready_timeout:g}s"
                + (
                    f"; it exited with code {rep.app.proc.returncode}"
                    if rep.app.proc and rep.app.proc.returncode is not None
                    else ""
                )
            )
        if rep.services:
            self.cp.registry.add_instance(
                WorkloadInstance(
                    name=rep.name,
                    workload=rep.workload,
                    address="127.0.0.1",
                    ports={i.service_port: i.listen_port for i in rep.proxy.inbound},
                    services=rep.services,
                    namespace=rep.namespace,
                    labels=dict(rep.proxy.node.labels),
                    service_account=rep.proxy.node.service_account,
                    has_sidecar=True,
                ),
                admin_url=f"http://127.0.0.1:{rep.admin_port}",
            )
        rep.state = "ready"
        rep.watch = asyncio.get_running_loop().create_task(self._watch_app(rep))

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
        self.cp.add_proxy(rep.proxy, admin_url=f"http://127.0.0.1:{rep.admin_port}")

    def _identity_env(self, rep: Replica) -> dict[str, str]:
        """The sidecar's bootstrap token (its SPIFFE id is inside): it fetches its cert with it."""
        node = rep.proxy.node
        token = self.cp.identity.token_for(node.namespace, node.service_account)
        path = self._token_dir / f"{rep.node_id}.token"
        write_secret(path, token)
        return {TOKEN_FILE_ENV: str(path)}  # a path, not the secret

    def _sidecar_child(self, rep: Replica) -> Child:
        def on_sidecar_line(line: str) -> bool:
            if line.startswith("{") and '"ready"' in line:
                with contextlib.suppress(ValueError):
                    if json.loads(line).get("event") == "ready":
                        rep.sidecar_ready.set()
                        return True
            return False

        return Child(
            f"{rep.name} sidecar",
            self.sidecar_argv(self.cp.url, rep.node_id, rep.admin_port),
            env={**os.environ, "PYTHONUNBUFFERED": "1", **self._identity_env(rep)},
            out=self.out,
            on_line=on_sidecar_line,
        )

    async def _wait_sidecar(self, rep: Replica) -> bool:
        assert rep.sidecar is not None and self._session is not None
        deadline = time.monotonic() + self.ready_timeout
        retries = 3
        handled = ""  # the NACKed version already answered with new ports
        while time.monotonic() < deadline:
            url = f"http://127.0.0.1:{rep.admin_port}/ready"
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
                rep.admin_port = self._alloc()
                self.cp.add_proxy(rep.proxy, admin_url=f"http://127.0.0.1:{rep.admin_port}")
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

    async def _watch_app(self, rep: Replica) -> None:
        assert rep.app is not None
        code = await rep.app.wait()
        if self.stopping:
            return
        rep.state = "exited"
        rep.detail = f"app exited with code {code}"
        self.say(f"[{rep.name}] exited with code {code}; draining its sidecar")
        self.cp.registry.remove_instance(rep.name)
        self._changed()
        if rep.sidecar is not None:
            await rep.sidecar.stop()
        self.cp.remove_proxy(rep.node_id)
        if all(r.state in ("exited", "failed") for r in self.replicas if not r.is_gateway):
            self.exited.set()

    async def _watch_sidecar(self, rep: Replica) -> None:
        assert rep.sidecar is not None
        code = await rep.sidecar.wait()
        if self.stopping or rep.state == "exited":
            return
        rep.state = "failed"
        rep.detail = f"sidecar exited with code {code}"
        self.say(
            f"[{rep.name}] sidecar exited with code {code}; health checks take the instance out "
            "of every endpoint list"
        )
        self._changed()

    # ------------------------------------------------------------------ stop

    async def stop(self) -> None:
        """Apps first, then sidecars, then the control plane. Safe to call twice."""
        if self.stopping and self.state == "stopped":
            return
        self.stopping = True
        self.state = "stopping"
        self._changed()
        apps = [r for r in self.replicas if r.app is not None]
        for r in apps:
            self.cp.registry.remove_instance(r.name)
        await asyncio.gather(*(r.app.stop() for r in apps if r.app is not None))
        await asyncio.gather(*(r.sidecar.stop() for r in self.replicas if r.sidecar is not None))
        for r in self.replicas:
            for task in (r.watch, r.sidecar_watch):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
            if r.state != "failed":
                r.state = "stopped"
        await self.cp.stop()
        shutil.rmtree(self._token_dir, ignore_errors=True)
        if self._session is not None:
            await self._session.close()
        self.state = "stopped"
        self._changed()

    def pids(self) -> list[int]:
        out = []
        for r in self.replicas:
            for c in (r.sidecar, r.app):
                if c is not None and c.pid is not None:
                    out.append(c.pid)
        return out
