"""A WebSocket echo app for e2e tests (the `websockets` library): greets with its pod name."""

import asyncio
import os
import signal

from websockets.asyncio.server import ServerConnection, serve


async def echo(ws: ServerConnection) -> None:
    await ws.send(f"hello from {os.environ.get('POD_NAME', '?')} {ws.request.path}")
    async for msg in ws:
        await ws.send(msg)


async def main() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with serve(echo, "127.0.0.1", int(os.environ.get("PORT", "0"))) as server:
        port = server.sockets[0].getsockname()[1]
        print(f"{os.environ.get('POD_NAME', 'ws')} listening on ws://127.0.0.1:{port}", flush=True)
        await stop.wait()


asyncio.run(main())
