"""Health checks of a registered workload from ``WorkloadGroup.probe`` (run beside the workload).

Theory of operation
-------------------
As Istio's agent does on a VM (``istio-agent/health``): the probe fields get Istio's defaults
(thresholds 1, timeout 1 s, period 10 s, ``httpGet`` path ``/``, host ``localhost``, scheme
HTTP); after ``initialDelaySeconds`` the first check runs at once, then one every
``periodSeconds``. ``ProbeTracker`` (sans-I/O) counts consecutive results and says when the
state changes: healthy after ``successThreshold`` successes in a row, unhealthy after
``failureThreshold`` failures in a row. Only changes are reported, the first one always. The
sidecar's own ``/ready`` is probed too (Istio aggregates Envoy's readiness the same way): a
workload whose sidecar is down is unhealthy.

Checks: ``httpGet`` (any status from 200 to 399 is a success, as in Kubernetes), ``tcpSocket``
(the connection opens) and ``exec`` (the command exits 0). ``grpc`` is not implemented (a
warning, and the workload is reported healthy while its sidecar is ready). Without traffic
capture (local mode) the app listens on a port the agent picked: a probe port that names one of
the workload's ports is dialled at the app's actual port (``port_map``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

log = logging.getLogger(__name__)


@dataclass
class ProbeConfig:
    """``WorkloadGroup.probe`` (camelCase JSON as the control plane sends it) with defaults."""

    initial_delay: float = 0.0
    timeout: float = 1.0
    period: float = 10.0
    success_threshold: int = 1
    failure_threshold: int = 1
    method: str = ""  # httpGet | tcpSocket | exec | grpc | "" (none)
    host: str = "localhost"
    port: int = 0
    path: str = "/"
    scheme: str = "http"
    headers: dict[str, str] = field(default_factory=dict)
    command: list[str] = field(default_factory=list)

    @classmethod
    def from_json(cls, probe: dict[str, Any]) -> ProbeConfig:
        cfg = cls(
            initial_delay=float(probe.get("initialDelaySeconds") or 0),
            timeout=float(probe.get("timeoutSeconds") or 1),
            period=float(probe.get("periodSeconds") or 10),
            success_threshold=int(probe.get("successThreshold") or 1),
            failure_threshold=int(probe.get("failureThreshold") or 1),
        )
        if (http := probe.get("httpGet")) is not None:
            cfg.method = "httpGet"
            cfg.host = http.get("host") or "localhost"
            cfg.port = int(http.get("port") or 0)
            cfg.path = http.get("path") or "/"
            cfg.scheme = (http.get("scheme") or "HTTP").lower()
            cfg.headers = {
                str(h.get("name")): str(h.get("value") or "")
                for h in http.get("httpHeaders") or []
                if h.get("name")
            }
        elif (tcp := probe.get("tcpSocket")) is not None:
            cfg.method = "tcpSocket"
            cfg.host = tcp.get("host") or "localhost"
            cfg.port = int(tcp.get("port") or 0)
        elif (ex := probe.get("exec")) is not None:
            cfg.method = "exec"
            cfg.command = [str(c) for c in ex.get("command") or []]
        elif probe.get("grpc") is not None:
            cfg.method = "grpc"
        return cfg


class ProbeTracker:
    """Consecutive results -> state changes (Istio's ``PerformApplicationHealthCheck``)."""

    def __init__(self, success_threshold: int = 1, failure_threshold: int = 1) -> None:
        self.success_threshold = max(1, success_threshold)
        self.failure_threshold = max(1, failure_threshold)
        self.successes = 0
        self.failures = 0
        self.state: bool | None = None  # None until the first change

    def observe(self, ok: bool) -> bool | None:
        """Record one result; the new state if it changes now, else None."""
        if ok:
            self.successes += 1
            self.failures = 0
            if self.successes >= self.success_threshold and self.state is not True:
                self.successes = 0
                self.state = True
                return True
        else:
            self.failures += 1
            self.successes = 0
            if self.failures >= self.failure_threshold and self.state is not False:
                self.failures = 0
                self.state = False
                return False
        return None


async def check_http(cfg: ProbeConfig, port: int, session: aiohttp.ClientSession) -> str:
    """ "" when healthy, else why not."""
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    url = f"{cfg.scheme}://{host}:{port}{cfg.path}"
    ctx: ssl.SSLContext | bool = False
    if cfg.scheme == "https":  # Kubernetes does not verify a probe's certificate
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    try:
        async with session.get(
            url,
            headers=cfg.headers,
            ssl=ctx,
            allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=cfg.timeout),
        ) as resp:
            await resp.read()
            if 200 <= resp.status < 400:
                return ""
            return f"HTTP probe {url} answered {resp.status}"
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        return f"HTTP probe {url} failed: {type(exc).__name__}: {exc}"


async def check_tcp(cfg: ProbeConfig, port: int) -> str:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(cfg.host, port), cfg.timeout)
    except (OSError, TimeoutError) as exc:
        return f"TCP probe {cfg.host}:{port} failed: {type(exc).__name__}: {exc}"
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return ""


async def check_exec(cfg: ProbeConfig) -> str:
    if not cfg.command:
        return "exec probe has no command"
    try:
        proc = await asyncio.create_subprocess_exec(
            *cfg.command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
    except OSError as exc:
        return f"exec probe {cfg.command[0]!r} cannot start: {exc}"
    try:
        code = await asyncio.wait_for(proc.wait(), cfg.timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        return f"exec probe timed out after {cfg.timeout:g}s"
    return "" if code == 0 else f"exec probe exited with code {code}"


class WorkloadProber:
    """Runs the probe (and the sidecar readiness check) and calls ``on_change`` on changes."""

    def __init__(
        self,
        cfg: ProbeConfig,
        on_change: Callable[[bool, str], Awaitable[None] | None],
        *,
        sidecar_ready_url: str = "",
        port_map: dict[int, int] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.cfg = cfg
        self.on_change = on_change
        self.sidecar_ready_url = sidecar_ready_url
        self.port_map = port_map or {}
        self.tracker = ProbeTracker(cfg.success_threshold, cfg.failure_threshold)
        self.sleep = sleep
        self.checks = 0
        self.last_message = ""
        if cfg.method == "grpc":
            log.warning("grpc probes are not implemented; only the sidecar's readiness is checked")

    async def check_once(self, session: aiohttp.ClientSession) -> str:
        """One aggregated check: "" when healthy, else the first reason it is not."""
        if self.sidecar_ready_url:
            try:
                async with session.get(
                    self.sidecar_ready_url, timeout=aiohttp.ClientTimeout(total=self.cfg.timeout)
                ) as resp:
                    if resp.status != 200:
                        return f"sidecar not ready ({resp.status})"
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                return f"sidecar not ready: {type(exc).__name__}"
        port = self.port_map.get(self.cfg.port, self.cfg.port)
        if self.cfg.method == "httpGet":
            return await check_http(self.cfg, port, session)
        if self.cfg.method == "tcpSocket":
            return await check_tcp(self.cfg, port)
        if self.cfg.method == "exec":
            return await check_exec(self.cfg)
        return ""

    async def run(self) -> None:
        await self.sleep(self.cfg.initial_delay)
        async with aiohttp.ClientSession() as session:
            while True:
                why = await self.check_once(session)
                self.checks += 1
                change = self.tracker.observe(not why)
                if change is not None:
                    self.last_message = why
                    log.log(
                        logging.INFO if change else logging.WARNING,
                        "workload is %s%s",
                        "healthy" if change else "UNHEALTHY",
                        f": {why}" if why else "",
                    )
                    result = self.on_change(change, why)
                    if result is not None:
                        await result
                await self.sleep(self.cfg.period)
