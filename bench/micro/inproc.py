"""In-process profile of the sidecar's request path: calls and Python time per proxied request.

One uvloop loop runs a fixed-response upstream (nginx-like response head), a diktyo ``Sidecar``
with the bench's translated Istio config (VirtualService with 4 rules, DestinationRule, metrics)
and a closed-loop client (``--connections`` keep-alive connections, wrk-like GET). cProfile
counts every call; the report lists the diktyo functions per request, which is deterministic
(no machine noise), so a hot-path change shows up as fewer calls / less time per request.

    python bench/micro/inproc.py [--requests 20000] [--connections 50] [--no-profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import configs
import targets as tg

RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sat, 28 Nov 2026 10:00:00 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\nok\n"
)


class Upstream(asyncio.Protocol):
    def connection_made(self, t: asyncio.BaseTransport) -> None:
        self.t = t

    def data_received(self, data: bytes) -> None:
        n = data.count(b"\r\n\r\n")
        self.t.write(RESPONSE * n)  # type: ignore[attr-defined]


class Client(asyncio.Protocol):
    def __init__(self, port: int, state: dict[str, int], done: asyncio.Future[None]) -> None:
        self.req = (
            b"GET / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUser-Agent: wrk\r\nAccept: */*\r\n\r\n" % port
        )
        self.state = state
        self.done = done

    def connection_made(self, t: asyncio.BaseTransport) -> None:
        self.t = t
        self.t.write(self.req)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        n = data.count(b"HTTP/1.1 ")
        st = self.state
        st["got"] += n
        if st["sent"] < st["total"]:
            st["sent"] += 1
            self.t.write(self.req)  # type: ignore[attr-defined]
        elif st["got"] >= st["total"] and not self.done.done():
            self.done.set_result(None)


def count_opcodes() -> tuple[list[int], object]:
    """A tracer counting bytecode instructions executed outside this harness (deterministic:
    a proxy for interpreter work that other tenants of the machine cannot disturb)."""
    n = [0]

    def local(frame: object, event: str, arg: object) -> object:
        if event == "opcode":
            n[0] += 1
        return local

    def global_(frame: object, event: str, arg: object) -> object:
        if "bench/micro" not in frame.f_code.co_filename:  # type: ignore[attr-defined]
            frame.f_trace_opcodes = True  # type: ignore[attr-defined]
            return local
        return None

    return n, global_


async def run(requests: int, conns: int, profile: bool, opcodes: bool = False) -> None:
    from diktyo.proxy.sidecar import Sidecar
    from diktyo.snapshot import codec

    loop = asyncio.get_running_loop()
    up = await loop.create_server(Upstream, "127.0.0.1", 0)
    up_port = up.sockets[0].getsockname()[1]
    tmp = Path(tempfile.mkdtemp(prefix="diktyo-inproc-"))
    yaml_text = configs.istio_yaml(("127.0.0.1", up_port), ("127.0.0.1", up_port))
    snap = codec.from_builtins(tg.translated_snapshot(tmp, "inproc", yaml_text, "client"))
    sc = Sidecar(loop=loop, seed=1)
    sc.apply(snap)
    await sc.wait_listening()
    port = sc.ports()[tg.CLIENT_LISTENER]

    async def batch(n: int) -> float:
        state = {"sent": conns, "got": 0, "total": n}
        done: asyncio.Future[None] = loop.create_future()
        ts = []
        t0 = time.perf_counter()
        for _ in range(conns):
            t, _ = await loop.create_connection(
                lambda: Client(port, state, done), "127.0.0.1", port
            )
            ts.append(t)
        await done
        dt = time.perf_counter() - t0
        for t in ts:
            t.close()
        return dt

    await batch(2000)  # warm up: pool, caches
    if opcodes:
        n, tracer = count_opcodes()
        sys.settrace(tracer)  # type: ignore[arg-type]
        await batch(requests)
        sys.settrace(None)
        print(f"Python bytecode instructions per request (sidecar, stdlib): {n[0] / requests:.0f}")
    elif profile:
        pr = cProfile.Profile()
        pr.enable()
        dt = await batch(requests)
        pr.disable()
        st = pstats.Stats(pr)
        rows = []
        total_calls = 0
        total_tt = 0.0
        for (file, line, fn), (cc, nc, tt, ct, _) in st.stats.items():  # type: ignore[attr-defined]
            if "/diktyo/" in file:
                total_calls += nc
                total_tt += tt
                rows.append((nc / requests, tt * 1e6 / requests, f"{Path(file).name}:{line} {fn}"))
        rows.sort(key=lambda r: -r[1])
        print(f"diktyo Python calls per request: {total_calls / requests:.1f}")
        print(f"diktyo Python self time per request (profiled): {total_tt * 1e6 / requests:.1f} us")
        for calls, us, name in rows[:80]:
            print(f"  {calls:6.2f} calls  {us:6.2f} us  {name}")
    else:
        c0 = time.process_time()
        dt = await batch(requests)
        cpu = time.process_time() - c0
        print(
            f"{cpu * 1e6 / requests:.1f} us CPU per request in-process (client, sidecar and "
            f"upstream on one loop; {requests / dt:.0f} rps)"
        )
    await sc.stop()
    up.close()


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument(
        "--opcodes",
        action="store_true",
        help="count Python bytecode instructions per request (sidecar, stdlib)",
    )
    args = ap.parse_args()
    import uvloop

    uvloop.install()
    asyncio.run(run(args.requests, args.connections, not args.no_profile, args.opcodes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
