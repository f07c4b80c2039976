"""``diktyo dashboard``: print (and open) the running mesh's dashboard URL, like ``istioctl dashboard``.

The URL comes from ``--control-plane`` / ``$DIKTYO_CONTROL_PLANE`` / the mesh started by
``diktyo up`` (its ``dashboard`` entry in ``mesh.json``). The browser is opened with
:mod:`webbrowser` unless ``--no-browser``, ``$CI`` is set, or there is no display.
``--port-forward`` serves the dashboard on a fixed local port (``--port``, default 20001 as
``istioctl dashboard kiali``) through a small TCP forwarder until Ctrl-C — handy for an SSH
tunnel to a mesh whose control plane picked a random port.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import webbrowser
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from diktyo.cli._common import add_cp_arg, call
from diktyo.platform.state import control_plane_url, running_state
from diktyo.security import admin_token

DEFAULT_FORWARD_PORT = 20001


def dashboard_url(explicit: str | None = None) -> str:
    """The dashboard URL of the mesh: ``<control plane>/``. Raises ``LookupError`` with advice."""
    if not explicit and not os.environ.get("DIKTYO_CONTROL_PLANE"):
        state = running_state()
        if state and state.get("dashboard"):
            return str(state["dashboard"])
    return control_plane_url(explicit) + "/"


def should_open_browser(no_browser: bool, env: Mapping[str, str], platform: str) -> bool:
    """Open a browser only when asked and possible: not in CI, and (on Linux) with a display."""
    if no_browser or env.get("CI", "").lower() not in ("", "0", "false"):
        return False
    headless = not (env.get("DISPLAY") or env.get("WAYLAND_DISPLAY"))
    return not (platform.startswith("linux") and headless)


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "dashboard",
        help="print and open the mesh dashboard",
        description=(
            "Print the URL of the running mesh's dashboard (service graph, golden signals, "
            "traces, config) and open it in a browser (not with --no-browser, in CI, or "
            "without a display)."
        ),
    )
    p.add_argument("--no-browser", action="store_true", help="only print the URL")
    p.add_argument(
        "--port-forward",
        action="store_true",
        help="serve the dashboard on a fixed local port (--port) until Ctrl-C",
    )
    p.add_argument(
        "--port",
        type=int,
        default=DEFAULT_FORWARD_PORT,
        help=f"local port for --port-forward (default {DEFAULT_FORWARD_PORT}, 0 = pick)",
    )
    p.add_argument("--address", default="127.0.0.1", help="address for --port-forward")
    add_cp_arg(p)
    p.set_defaults(func=run)


# --------------------------------------------------------------------------- forwarder


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


class Forwarder:
    """TCP forwarder ``address:port`` -> ``target_host:target_port`` (each connection piped)."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[Any]] = set()

    async def start(self, address: str = "127.0.0.1", port: int = 0) -> int:
        self.server = await asyncio.start_server(self._handle, address, port)
        return int(self.server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        try:
            try:
                ur, uw = await asyncio.open_connection(*self.target)
            except OSError:
                writer.close()
                return
            await asyncio.gather(_pipe(reader, uw), _pipe(ur, writer))
        finally:
            self._conns.discard(task)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            for t in list(self._conns):
                t.cancel()
            await asyncio.gather(*self._conns, return_exceptions=True)
            await self.server.wait_closed()
            self.server = None


async def _forward(url: str, address: str, port: int, open_browser: bool) -> int:
    parts = urlsplit(url)
    fwd = Forwarder(parts.hostname or "127.0.0.1", parts.port or 80)
    try:
        local_port = await fwd.start(address, port)
    except OSError as exc:
        print(
            f"error: cannot listen on {address}:{port}: {exc.strerror or exc}; pick another "
            "port with --port N (0 = any free port)",
            file=sys.stderr,
        )
        return 1
    local = f"http://{address}:{local_port}{parts.path or '/'}"
    if parts.query:
        local += "?" + parts.query
    print(f"dashboard: {local} (forwarding to {url}; Ctrl-C to stop)", flush=True)
    if open_browser:
        webbrowser.open(local)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await fwd.close()
    return 0


# --------------------------------------------------------------------------- command


def run(args: argparse.Namespace) -> int:
    try:
        url = dashboard_url(getattr(args, "control_plane", None))
    except LookupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    base = url.rstrip("/")
    try:
        status, _ = call("GET", base + "/healthz", timeout=5)
    except ConnectionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(
            f"error: the control plane at {base} answered HTTP {status} on /healthz",
            file=sys.stderr,
        )
        return 1
    open_browser = should_open_browser(args.no_browser, os.environ, sys.platform)
    token = admin_token.read()  # the link carries the admin credential (the page keeps it)
    if token:
        url = f"{base}/?token={token}"
    if args.port_forward:
        return asyncio.run(_forward(url, args.address, args.port, open_browser))
    print(url)
    if open_browser:
        webbrowser.open(url)
    return 0
