#!/usr/bin/env python3
"""Which objects of a proxied request end in reference cycles (freed only by the cyclic GC).

An in-process sidecar (the h2bench snapshot: HTTP/2 upstream, or HTTP/1.1 with ``h1``) in front
of an nginx upstream on core 1, loaded with ``h2load -n N`` (``--h1`` for HTTP/1.1); after a
warm-up the collector is off and in DEBUG_SAVEALL, so one ``gc.collect()`` at the end lists
every object that reference counting did not free, by type, per request.

    .venv/bin/python bench/h2cycles.py h2 5000
    .venv/bin/python bench/h2cycles.py h1 5000
"""

import asyncio
import collections
import gc
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import h2bench as hb
import procs


async def main(proto: str, n: int) -> None:
    from diktyo.proxy.sidecar import Sidecar
    from diktyo.snapshot import codec

    tmp = Path(tempfile.mkdtemp(prefix="tidy-cyc-"))
    up = procs.free_port()
    if proto == "h2":
        (tmp / "up.conf").write_text(hb.upstream_conf(tmp, up))
        snapd = hb.diktyo_snapshot(0, up)
    else:
        import configs

        (tmp / "up.conf").write_text(configs.upstream_nginx_conf(tmp, up))
        snapd = hb.diktyo_snapshot(0, up)
        for c in snapd["clusters"]:
            c["upstream_protocol"] = "HTTP/1.1"
    if proto == "h2":
        upstream = hb.spawn(
            "upstream", ["nginx", "-c", str(tmp / "up.conf")], up, tmp / "up.log", procs.LOAD_CORE
        )
    else:
        import subprocess
        import time

        pp = subprocess.Popen(["nginx", "-c", str(tmp / "up.conf")])
        time.sleep(1)

        class U:
            def stop(self):
                pp.terminate()
                pp.wait()

        upstream = U()
    try:
        loop = asyncio.get_running_loop()
        sc = Sidecar(loop=loop, seed=1)
        sc.apply(codec.from_builtins(snapd))
        await sc.wait_listening()
        port = list(sc.ports().values())[0]

        async def load(k):
            argv = ["h2load", f"-n{k}", "-c10", "-m10", "-t1", f"http://127.0.0.1:{port}/"]
            if proto != "h2":
                argv.insert(1, "--h1")
            p = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
            out, _ = await p.communicate()
            return out.decode()

        await load(2000)
        gc.collect()
        gc.freeze()
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.disable()
        c0 = gc.get_count()[0]
        out = await load(n)
        c1 = gc.get_count()[0]
        print([ln for ln in out.splitlines() if ln.startswith("requests:")])
        print("gen0 net growth per request:", (c1 - c0) / n)
        gc.collect()
        types = collections.Counter(
            type(o).__module__ + "." + type(o).__qualname__ for o in gc.garbage
        )
        print("garbage objects per request:", len(gc.garbage) / n)
        for t, c in types.most_common(25):
            print(f"  {c / n:6.2f}  {t}")
        gc.set_debug(0)
        gc.garbage.clear()
        await sc.stop()
    finally:
        upstream.stop()


import uvloop  # noqa: E402

uvloop.install()
asyncio.run(main(sys.argv[1], int(sys.argv[2])))
