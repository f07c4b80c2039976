"""The docs/fleet.md walkthrough, step by step, with the real commands: a control plane, the
samples/fleet groups applied, tokens from /v1/tokens, two hosts joined with `diktyo join`,
mTLS between them, a failing probe, and a killed host removed after the grace period."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from diktyo.testing import eventually

ROOT = Path(__file__).resolve().parents[2]
FLEET = ROOT / "samples" / "fleet"
DIKTYO = [sys.executable, "-m", "diktyo.cli.main"]


async def _start(env: dict[str, str], *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *DIKTYO, *args, env=env, stdout=asyncio.subprocess.PIPE
    )


async def _line(proc: asyncio.subprocess.Process, prefix: bytes, timeout: float = 60) -> bytes:
    assert proc.stdout is not None
    while True:
        line = await asyncio.wait_for(proc.stdout.readline(), timeout)
        assert line, f"{proc.pid} exited with {await proc.wait()} before printing {prefix!r}"
        if line.startswith(prefix):
            return line


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()


@pytest.mark.timeout(180)
async def test_fleet_walkthrough(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "DIKTYO_HOME": str(tmp_path / "home"),
        "PILOT_WORKLOAD_ENTRY_GRACE_PERIOD": "2s",
    }
    procs: list[asyncio.subprocess.Process] = []
    cp = await _start(env, "control-plane", "--port", "0")
    procs.append(cp)
    try:
        # 1. a control plane, and the groups
        url = (await _line(cp, b"control plane serving on")).decode().split()[-1].rstrip(",")
        applied = await asyncio.create_subprocess_exec(
            *DIKTYO, "apply", "--control-plane", url, "-f", str(FLEET / "fleet.yaml"), env=env
        )
        assert await applied.wait() == 0
        admin = (tmp_path / "home" / "admin-token").read_text().strip()
        headers = {"Authorization": f"Bearer {admin}"}
        async with aiohttp.ClientSession() as session:
            # 2. a bootstrap token per identity
            for sa in ("httpbin", "sleep"):
                async with session.post(
                    url + "/v1/tokens",
                    json={"namespace": "default", "service_account": sa, "ttl": 86400},
                    headers=headers,
                ) as resp:
                    assert resp.status == 200
                    token = (await resp.json())["token"]
                path = tmp_path / f"{sa}.token"
                path.write_text(token)
                path.chmod(0o600)

            # 3. two hosts join
            joined: dict[str, Any] = {}
            for sa, host in (("httpbin", "host-b.yaml"), ("sleep", "host-a.yaml")):
                agent = await _start(
                    env, "join", "--control-plane", url,
                    "--token-file", str(tmp_path / f"{sa}.token"),
                    "--host-file", str(FLEET / host),
                    "--log-dir", str(tmp_path / f"{sa}-logs"),
                )  # fmt: skip
                procs.append(agent)
                joined[sa] = json.loads(await _line(agent, b'{"event": "joined"'))
            (b_workload,) = joined["httpbin"]["workloads"]
            (a_workload,) = joined["sleep"]["workloads"]
            assert b_workload["entry"] == "httpbin-127.0.0.3"
            assert a_workload["entry"] == "sleep-127.0.0.2"
            assert a_workload["control_plane"] == url

            async def entries() -> list[str]:
                async with session.get(url + "/v1/config", headers=headers) as resp:
                    keys = (await resp.json())["resources"]
                return sorted(name for kind, _, name in keys if kind == "WorkloadEntry")

            assert await entries() == ["httpbin-127.0.0.3", "sleep-127.0.0.2"]

            # 4. traffic between the hosts: sleep's sidecar as HTTP proxy, mTLS to httpbin
            proxy = f"http://127.0.0.2:{a_workload['outbound_port']}"

            async def headers_seen() -> dict[str, str] | None:
                async with session.get("http://httpbin.default:8000/headers", proxy=proxy) as resp:
                    return (await resp.json())["headers"] if resp.status == 200 else None

            seen = await eventually(headers_seen, timeout=30, what="sleep -> httpbin")
            xfcc = seen["X-Forwarded-Client-Cert"]
            assert xfcc.startswith("By=spiffe://cluster.local/ns/default/sa/httpbin;")
            assert xfcc.endswith(";URI=spiffe://cluster.local/ns/default/sa/sleep")
            # STRICT: a plain request straight to host B's inbound port is refused
            inbound = f"http://127.0.0.3:{b_workload['inbound_ports']['8000']}/headers"
            with pytest.raises(aiohttp.ClientError):
                async with session.get(inbound) as resp:
                    await resp.read()

            # 5. a host that goes away: removed after the grace period, then 503
            httpbin_agent = procs[1]
            httpbin_agent.send_signal(signal.SIGKILL)
            await httpbin_agent.wait()
            await eventually(
                lambda: entries_is(entries, ["sleep-127.0.0.2"]), timeout=20, what="entry gone"
            )

            async def no_endpoint() -> bool:
                # a request racing the removal may still try the dead host ("connection
                # failure"); once the entry is gone the cluster has no endpoint at all
                async with session.get("http://httpbin.default:8000/headers", proxy=proxy) as resp:
                    return resp.status == 503 and "no healthy upstream" in await resp.text()

            await eventually(no_endpoint, timeout=10, what="503 no healthy upstream")
    finally:
        for proc in reversed(procs):
            await _stop(proc)


async def entries_is(get: Any, want: list[str]) -> bool:
    return bool(await get() == want)
