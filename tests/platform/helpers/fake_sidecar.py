"""A stand-in sidecar for platform tests: real ConfigClient, admin /ready, naive HTTP forwarding.

Usage: python fake_sidecar.py --control-plane URL --node ID --admin-port P
Outbound listeners route by Host to the first cluster of the first route of the matching
virtual host; inbound listeners forward to their cluster's first endpoint.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import signal
import sys

import aiohttp
from aiohttp import web

sys.path.insert(0, __file__.rsplit("/tests/", 1)[0] + "/src")

from diktyo.proxy.config_client import ConfigClient
from diktyo.security.admin_token import read_secret_file
from diktyo.security.spiffe import TOKEN_FILE_ENV
from diktyo.snapshot.model import Snapshot


class FakeSidecar:
    def __init__(self) -> None:
        self.snap: Snapshot | None = None
        self.runners: list[web.AppRunner] = []
        self.rr = itertools.count()

    def cluster(self, name: str):
        assert self.snap is not None
        return next(c for c in self.snap.clusters if c.name == name)

    def pick(self, cluster_name: str) -> str:
        eps = self.cluster(cluster_name).endpoints
        if not eps:
            raise web.HTTPServiceUnavailable(text="no healthy upstream")
        ep = eps[next(self.rr) % len(eps)]
        return f"http://{ep.address}:{ep.port}"

    async def forward(self, request: web.Request, base: str) -> web.Response:
        async with (
            aiohttp.ClientSession() as s,
            s.request(
                request.method, base + request.rel_url.path_qs, data=await request.read()
            ) as r,
        ):
            return web.Response(status=r.status, body=await r.read())

    def handler(self, listener):
        async def outbound(request: web.Request) -> web.Response:
            assert self.snap is not None
            host = request.host
            table = next(t for t in self.snap.route_tables if t.name == listener.route_table)
            for vh in table.virtual_hosts:
                if host in vh.domains or host.split(":")[0] in vh.domains:
                    return await self.forward(request, self.pick(vh.routes[0].clusters[0].cluster))
            return web.Response(status=404, text=f"no route for {host}")

        async def inbound(request: web.Request) -> web.Response:
            return await self.forward(request, self.pick(listener.cluster))

        return outbound if listener.direction in ("outbound", "gateway") else inbound

    async def on_snapshot(self, snap: Snapshot) -> None:
        if self.snap is None:  # listeners are opened once, from the first good snapshot
            ports, runners = {}, []
            try:
                for lst in snap.listeners:
                    app = web.Application()
                    app.router.add_route("*", "/{tail:.*}", self.handler(lst))
                    runner = web.AppRunner(app, access_log=None)
                    await runner.setup()
                    runners.append(runner)
                    await web.TCPSite(runner, "127.0.0.1", lst.port).start()
                    ports[lst.name] = lst.port
            except OSError as exc:
                for r in runners:
                    await r.cleanup()
                raise ValueError(f"cannot bind 127.0.0.1:{lst.port}: {exc.strerror}") from None
            self.runners = runners
            self.snap = snap
            print(json.dumps({"event": "ready", "listeners": ports}), flush=True)
        else:
            self.snap = snap


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--control-plane")
    ap.add_argument("--node")
    ap.add_argument("--admin-port", type=int)
    args = ap.parse_args()
    sc = FakeSidecar()
    # the bootstrap token the platform hands over in a 0600 file (path in the environment)
    token_file = os.environ.get(TOKEN_FILE_ENV)
    token = read_secret_file(token_file) if token_file else None
    client = ConfigClient(args.control_plane, args.node, sc.on_snapshot, token=token)

    async def ready(request: web.Request) -> web.Response:
        return web.Response(status=200 if sc.snap else 503, text="ok")

    admin = web.Application()
    admin.router.add_get("/ready", ready)
    runner = web.AppRunner(admin, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", args.admin_port).start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    client.start()
    await stop.wait()
    print("draining", flush=True)
    await client.close()
    for r in [*sc.runners, runner]:
        await r.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
