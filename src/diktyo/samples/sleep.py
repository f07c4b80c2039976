"""An idle client workload (Istio's ``sleep``/``curl`` sample): it serves nothing and waits.

Give it a sidecar in ``mesh.yaml`` and send requests *from* it, through its sidecar:
``diktyo load --via sleep http://httpbin:8000/get`` (or ``curl -x`` its outbound port).
Stops cleanly on SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys


async def _wait_for_signal(ready: str) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # said once the handlers are in: a SIGTERM sent on seeing this line stops it cleanly
    print(ready, flush=True)
    await stop.wait()


def main() -> int:
    pod = os.environ.get("POD_NAME", "").strip() or "sleep"
    proxy = os.environ.get("HTTP_PROXY", "")
    asyncio.run(
        _wait_for_signal(f"{pod} idle (no port); outgoing calls go through {proxy or 'no proxy'}")
    )
    print(f"{pod} stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
