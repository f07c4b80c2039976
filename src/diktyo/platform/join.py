"""``diktyo join``'s agent: run one host's workloads in the mesh and keep them registered.

Theory of operation
-------------------
A host file names the host's address and the workloads to run, each by its WorkloadGroup::

    address: 127.0.0.2          # this host's address; the sidecars' listeners bind it
    network: ""                 # optional: Istio network of this host
    locality: eu-west/zone-a    # optional: region/zone/subzone
    workloads:
    - group: ratings            # a WorkloadGroup applied to the control plane
      namespace: shop
      command: ["python3", "ratings.py"]   # optional: the app (PORT, HTTP_PROXY given)
      tokenFile: /etc/diktyo/ratings.token # optional: else the agent's --token-file

For each workload the agent (as Istio's agent on a VM):

1. opens the registration session (``platform.registration``) with the bootstrap token, which
   must be issued for the group's namespace and service account, and reads the group's
   template and probe from the control plane;
2. picks ports (sidecar admin and outbound; per template port an inbound listener on the host
   address and an app port), registers the sidecar's node and starts the sidecar (the same
   ``diktyo sidecar`` the local platform runs), then the app;
3. registers the WorkloadEntry (``<group>-<address>``; the control plane builds it from the
   group) and runs the group's probe, reporting each health change;
4. restarts a sidecar or app that exits (Kubernetes' back-off), keeps the session up across
   control plane restarts and fails over to the next control plane address.

When the agent stops (SIGTERM) or dies (its sidecars and apps die with it), the sessions end
and the control plane removes the entries after its grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

import aiohttp
import msgspec
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from diktyo.control.model import InboundPort, ProxyNode
from diktyo.platform.backoff import BackOff
from diktyo.platform.ports import free_port
from diktyo.platform.probes import ProbeConfig, WorkloadProber
from diktyo.platform.process import Child
from diktyo.platform.registration import RegistrationRefused, WorkloadRegistration
from diktyo.platform.supervisor import SidecarArgv, default_sidecar_argv
from diktyo.security.admin_token import read_secret_file, write_secret
from diktyo.security.spiffe import TOKEN_FILE_ENV
from diktyo.snapshot.model import Node


class JoinError(RuntimeError):
    """The agent cannot run a workload; the message says which and why, and what to do."""


class _M(BaseModel):
    model_config = ConfigDict(
        extra="forbid", alias_generator=to_camel, populate_by_name=True, frozen=True
    )


class HostWorkload(_M):
    group: str = Field(min_length=1)
    namespace: str = "default"
    command: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    labels: dict[str, str] = Field(default_factory=dict)  # added to the group's labels
    token_file: str | None = None


class HostSpec(_M):
    address: str = "127.0.0.1"
    network: str = ""
    locality: str = ""
    workloads: list[HostWorkload] = Field(min_length=1)


def load_host_file(path: str | Path, control_planes: Sequence[str] = ()) -> HostSpec:
    """The host file, or ``JoinError`` naming file, line and field of each problem.

    ``control_planes`` (their URLs) decide whether a loopback ``address`` is fine: only when
    every control plane is on this host too (see :func:`address_problem`)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise JoinError(f"{path}: cannot read host file: {exc.strerror or exc}") from None
    yaml = YAML(typ="rt")
    yaml.allow_duplicate_keys = False
    try:
        data = yaml.load(text)
    except YAMLError as exc:
        raise JoinError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise JoinError(f"{path}:1:1: a host file is a mapping with 'workloads' (see --help)")
    try:
        spec = HostSpec.model_validate(json.loads(json.dumps(data)))
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in err["loc"])
            line = _line_of(data, err["loc"])
            problems.append(f"{path}:{line}: error: {loc.replace('.[', '[')}: {err['msg']}")
        raise JoinError("\n".join(problems)) from None
    problem = address_problem(spec.address, control_planes)
    if problem:
        line = _line_of(data, ("address",))
        raise JoinError(f"{path}:{line}: error: address: {problem}")
    return spec


def address_problem(address: str, control_planes: Sequence[str] = ()) -> str:
    """Why ``address`` cannot be this host's address in the mesh ("" when it can).

    Other workloads reach this host's sidecars at ``address`` (its WorkloadEntry), so it must be
    one unicast address: not the unspecified address (``0.0.0.0``, ``::``), not multicast, not
    the IPv4 broadcast address, and not loopback when a control plane is on another host (the
    other hosts would reach their own loopback). A host name is left to the bind check."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return ""
    hint = "set it to one of this host's own unicast addresses (see 'ip -br addr')"
    if ip.is_unspecified:
        return (
            f"{address!r} is the unspecified address (listen on all): other workloads cannot "
            f"send to it; {hint}"
        )
    if ip.is_multicast:
        return f"{address!r} is a multicast address, not one host's address; {hint}"
    if ip == ipaddress.IPv4Address("255.255.255.255"):
        return f"{address!r} is the broadcast address, not one host's address; {hint}"
    if ip.is_loopback:
        remote = [u for u in control_planes if not _is_local_url(u)]
        if remote:
            return (
                f"{address!r} is a loopback address, but the control plane {remote[0]} is on "
                "another host: workloads there would reach their own loopback, not this host; "
                f"{hint} (a loopback address only suits a mesh on one machine)"
            )
    return ""


def _is_local_url(url: str) -> bool:
    """True when ``url``'s host is a loopback address or resolves only to loopback ones."""
    host = urlsplit(url if "://" in url else f"http://{url}").hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return False  # unknown names count as remote
    addrs = {str(info[4][0]) for info in infos}
    return bool(addrs) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs)


def _line_of(data: Any, loc: tuple[Any, ...]) -> int:
    node, line = data, 1
    for key in loc:
        lc = getattr(node, "lc", None)
        try:
            if lc is not None and isinstance(key, int):
                line = lc.item(key)[0] + 1
            elif lc is not None:
                line = lc.key(key)[0] + 1
            node = node[key]
        except (KeyError, IndexError, TypeError):
            break
    return line


@dataclass
class _Run:
    """One workload on this host."""

    spec: HostWorkload
    token: str
    token_path: Path
    reg: WorkloadRegistration
    node: ProxyNode | None = None
    admin_port: int = 0
    app_ports: dict[int, int] = field(default_factory=dict)  # workload port -> app port
    sidecar: Child | None = None
    app: Child | None = None
    sidecar_ready: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    state: str = "starting"


class JoinAgent:
    def __init__(
        self,
        spec: HostSpec,
        control_planes: list[str],
        token_file: str | None = None,
        *,
        out: TextIO | None = None,
        log_dir: str | Path | None = None,
        ready_timeout: float = 30.0,
        sidecar_argv: SidecarArgv = default_sidecar_argv,
    ) -> None:
        self.spec = spec
        self.urls = [u.rstrip("/") for u in control_planes]
        self.token_file = token_file
        self.out = out or sys.stdout
        self.ready_timeout = ready_timeout
        self.sidecar_argv = sidecar_argv
        self._own_log_dir = log_dir is None
        self.log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="diktyo-join-"))
        self._secrets = Path(tempfile.mkdtemp(prefix="diktyo-join-tokens-"))
        self.runs: list[_Run] = []
        self.stopping = False

    def _stopping_now(self) -> bool:
        return self.stopping

    def say(self, text: str) -> None:
        self.out.write(f"[join] {text}\n")
        self.out.flush()

    # ------------------------------------------------------------------ start

    async def start(self) -> None:
        _check_address(self.spec.address)
        for w in self.spec.workloads:
            self.runs.append(self._prepare(w))
        for run in self.runs:
            run.tasks.append(asyncio.get_running_loop().create_task(run.reg.run()))
        try:
            async with asyncio.TaskGroup() as tg:
                for run in self.runs:
                    tg.create_task(self._start_workload(run))
        except BaseExceptionGroup as group:
            first = next(
                (e for e in group.exceptions if isinstance(e, JoinError)), group.exceptions[0]
            )
            raise first from None

    def _prepare(self, w: HostWorkload) -> _Run:
        path = w.token_file or self.token_file
        if not path:
            raise JoinError(
                f"workload {w.namespace}/{w.group}: no bootstrap token; pass --token-file or set "
                "tokenFile in the host file (an admin issues one with POST /v1/tokens "
                '{"namespace": NS, "service_account": SA, "ttl": SECONDS})'
            )
        try:
            token = read_secret_file(path)
        except ValueError as exc:
            raise JoinError(f"workload {w.namespace}/{w.group}: bootstrap token: {exc}") from None
        copy = self._secrets / f"{w.namespace}.{w.group}.token"
        write_secret(copy, token)  # the sidecars read this copy (0600, removed on stop)
        reg = WorkloadRegistration(self.urls, token, w.namespace, w.group)
        run = _Run(w, token, copy, reg)

        def keep_token(fresh: str) -> None:  # a restarted sidecar starts with a valid token
            run.token = fresh
            write_secret(copy, fresh)

        async def registered_again(url: str) -> None:
            # a restarted control plane does not know the sidecar's node yet
            try:
                await self._register_node(run)
            except JoinError as exc:
                self.say(str(exc))

        reg.on_token = keep_token
        reg.on_registered = registered_again
        return run

    async def _start_workload(self, run: _Run) -> None:
        w = run.spec
        try:
            info = await run.reg.wait_group(self.ready_timeout)
        except RegistrationRefused as exc:
            raise JoinError(f"workload {w.namespace}/{w.group}: {exc}") from None
        template = info.get("template") or {}
        ports = sorted({int(p) for p in (template.get("ports") or {}).values()})
        sa = str(template.get("serviceAccount") or _token_sa(run.token))
        address = self.spec.address
        run.app_ports = {p: free_port() for p in ports}
        run.admin_port = free_port()
        run.node = ProxyNode(
            node=Node(
                id=f"{w.group}-{address}.{w.namespace}",
                workload=w.group,
                namespace=w.namespace,
                labels={**dict(info.get("labels") or {}), **w.labels},
                service_account=sa,
                mode="sidecar",
            ),
            address=address,
            outbound_port=free_port(address),
            inbound=tuple(InboundPort(p, free_port(address), run.app_ports[p]) for p in ports),
        )
        url = await self._register_node(run)
        await self._start_sidecar(run, url)
        if w.command:
            await self._start_app(run)
        run.reg.register(
            {
                "address": address,
                "node": run.node.node.id,
                "inbound": {str(i.service_port): i.listen_port for i in run.node.inbound},
                "labels": w.labels,
                "network": self.spec.network,
                "locality": self.spec.locality,
            }
        )
        probe = info.get("probe")
        loop = asyncio.get_running_loop()
        if probe:
            prober = WorkloadProber(
                ProbeConfig.from_json(probe),
                run.reg.set_health,
                sidecar_ready_url=f"http://127.0.0.1:{run.admin_port}/ready",
                port_map=dict(run.app_ports),
            )
            run.tasks.append(loop.create_task(prober.run()))
        run.tasks.append(loop.create_task(self._watch(run, "sidecar", url)))
        if w.command:
            run.tasks.append(loop.create_task(self._watch(run, "app", url)))
        await asyncio.wait_for(run.reg.registered.wait(), self.ready_timeout)
        run.state = "ready"
        self.say(
            f"{w.namespace}/{w.group}: registered as WorkloadEntry {run.reg.name} "
            f"(sidecar admin 127.0.0.1:{run.admin_port}, inbound "
            + ", ".join(f"{i.service_port}->{address}:{i.listen_port}" for i in run.node.inbound)
            + (", health checked" if probe else "")
            + ")"
        )

    async def _register_node(self, run: _Run) -> str:
        """``POST /v1/registry/proxies`` on the first control plane that takes it; its URL."""
        assert run.node is not None
        body = msgspec.to_builtins(run.node)
        headers = {"Authorization": f"Bearer {run.token}"}
        errors = []
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            for url in [run.reg.connected_to or self.urls[0]] + self.urls:
                try:
                    async with session.post(
                        url + "/v1/registry/proxies", json=body, headers=headers
                    ) as resp:
                        if resp.status == 200:
                            return url
                        errors.append(f"{url}: {resp.status} {(await resp.text())[:300]}")
                except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                    errors.append(f"{url}: {type(exc).__name__}: {exc}")
        raise JoinError(
            f"workload {run.spec.namespace}/{run.spec.group}: no control plane registered its "
            "sidecar: " + "; ".join(errors)
        )

    def _child(self, label: str, argv: list[str], **kwargs: Any) -> Child:
        return Child(
            label, argv, out=self.out, log_dir=self.log_dir, die_with_parent=True, **kwargs
        )

    async def _start_sidecar(self, run: _Run, url: str) -> None:
        assert run.node is not None
        run.sidecar_ready = asyncio.Event()

        def on_line(line: str) -> bool:
            if line.startswith("{") and '"ready"' in line:
                with contextlib.suppress(ValueError):
                    if json.loads(line).get("event") == "ready":
                        run.sidecar_ready.set()
                        return True
            return False

        run.sidecar = self._child(
            f"{run.spec.group} sidecar",
            # the sidecar fails over between control plane replicas itself ("URL,URL,...");
            # the one that registered its node goes first
            self.sidecar_argv(
                ",".join([url, *(u for u in self.urls if u != url)]),
                run.node.node.id,
                run.admin_port,
            ),
            env={**os.environ, "PYTHONUNBUFFERED": "1", TOKEN_FILE_ENV: str(run.token_path)},
            on_line=on_line,
        )
        await run.sidecar.start()
        deadline = time.monotonic() + self.ready_timeout
        while not run.sidecar_ready.is_set():
            if not run.sidecar.running or time.monotonic() > deadline:
                raise JoinError(
                    f"workload {run.spec.namespace}/{run.spec.group}: its sidecar did not become "
                    f"ready in {self.ready_timeout:g}s (see the '[{run.spec.group} sidecar]' "
                    f"lines; log: {run.sidecar.log_path})"
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(run.sidecar_ready.wait(), 0.1)

    async def _start_app(self, run: _Run) -> None:
        assert run.node is not None
        proxy = f"http://{self.spec.address}:{run.node.outbound_port}"
        first = next(iter(run.app_ports.values()), 0)
        env = {
            **os.environ,
            "HTTP_PROXY": proxy,
            "http_proxy": proxy,
            "NO_PROXY": "localhost,127.0.0.1",
            "no_proxy": "localhost,127.0.0.1",
            "PORT": str(first),
            "POD_NAME": run.node.node.id.rsplit(".", 1)[0],
            "POD_NAMESPACE": run.spec.namespace,
            "WORKLOAD_NAME": run.spec.group,
            "PYTHONUNBUFFERED": "1",
            **{f"PORT_{p}": str(a) for p, a in run.app_ports.items()},
            **run.spec.env,
        }
        argv = [a.replace("{python}", sys.executable) for a in run.spec.command]
        run.app = self._child(run.spec.group, argv, env=env)
        await run.app.start()
        deadline = time.monotonic() + self.ready_timeout
        for port in run.app_ports.values():
            while True:
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                    writer.close()
                    break
                except OSError:
                    if not run.app.running or time.monotonic() > deadline:
                        raise JoinError(
                            f"workload {run.spec.namespace}/{run.spec.group}: the app did not "
                            f"listen on its port {port} (env PORT) within {self.ready_timeout:g}s"
                        ) from None
                    await asyncio.sleep(0.05)

    async def _watch(self, run: _Run, container: str, url: str) -> None:
        """Restart the sidecar or app when it exits, with Kubernetes' back-off."""
        backoff = BackOff(base=1.0, cap=30.0, reset_after=60.0)
        while True:
            child = run.sidecar if container == "sidecar" else run.app
            assert child is not None
            started = time.monotonic()
            code = await child.wait()
            if self.stopping:
                return
            delay = backoff.next_delay(time.monotonic() - started)
            self.say(
                f"{run.spec.group}: {container} exited with code {code}; restarting it"
                + (f" in {delay:g}s" if delay else "")
            )
            await asyncio.sleep(delay)
            if self._stopping_now():  # stop() may have run while we slept
                return
            try:
                if container == "sidecar":
                    await self._register_node(run)
                    await self._start_sidecar(run, url)
                else:
                    await self._start_app(run)
            except JoinError as exc:
                self.say(str(exc))

    # ------------------------------------------------------------------ stop

    async def stop(self) -> None:
        """Apps, then sidecars, then the registration sessions (entries go after the grace)."""
        self.stopping = True
        for run in self.runs:
            for task in run.tasks[1:]:
                task.cancel()
        await asyncio.gather(*(r.app.stop() for r in self.runs if r.app is not None))
        await asyncio.gather(*(r.sidecar.stop() for r in self.runs if r.sidecar is not None))
        for run in self.runs:
            if run.tasks:
                run.tasks[0].cancel()
        await asyncio.gather(*(t for r in self.runs for t in r.tasks), return_exceptions=True)
        shutil.rmtree(self._secrets, ignore_errors=True)
        if self._own_log_dir:
            shutil.rmtree(self.log_dir, ignore_errors=True)

    def describe(self) -> list[dict[str, Any]]:
        out = []
        for run in self.runs:
            node = run.node
            out.append(
                {
                    "group": run.spec.group,
                    "namespace": run.spec.namespace,
                    "state": run.state,
                    "entry": run.reg.name,
                    "control_plane": run.reg.connected_to,
                    "admin_port": run.admin_port,
                    "outbound_port": node.outbound_port if node else 0,
                    "inbound_ports": {
                        str(i.service_port): i.listen_port for i in (node.inbound if node else ())
                    },
                    "app_ports": {str(k): v for k, v in run.app_ports.items()},
                    "sidecar_pid": run.sidecar.pid if run.sidecar else None,
                    "app_pid": run.app.pid if run.app else None,
                }
            )
        return out


def _check_address(address: str) -> None:
    """``JoinError`` unless this host (or the network namespace the agent runs in) has
    ``address``: the sidecars listen on it, so a wrong one would fail only after registering."""
    try:
        free_port(address)
    except (OSError, OverflowError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise JoinError(
            f"host file address {address!r} is not an address of this host ({reason}): the "
            "sidecars listen on it. Set 'address' to one of this host's addresses (see "
            "'ip -br addr'); an agent run in a network namespace ('ip netns exec NS diktyo "
            "join ...') needs the namespace's own address"
        ) from None


def _token_sa(token: str) -> str:
    """The service account in a bootstrap token's SPIFFE id (read, not verified)."""
    from diktyo.security.identity import token_subject

    sub = token_subject(token)
    return sub.rsplit("/sa/", 1)[1] if "/sa/" in sub else "default"
