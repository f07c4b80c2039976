"""The mTLS record layer alone, in one process (both ends, loopback, the sidecar's contexts):

    python bench/tls_record.py            # CPU per 250-byte echo round trip: plaintext, uvloop's
                                          # SSL transport, diktyo's record layer (3 x alternated)
    python bench/tls_record.py --idle 400 --mode uvloop      # RSS per idle mTLS connection pair
    python bench/tls_record.py --idle 400 --mode tlsrecord   # (one mode per process, alternate)

Wrap it in ``flock /work/wt/bench.lock`` like the other benchmarks. Figures: docs/performance.md,
"mTLS record layer, stop 21".
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import resource
import socket
from typing import Any

import uvloop

from diktyo.control.ca import CertificateAuthority
from diktyo.proxy.network.tls import CertificateStore
from diktyo.proxy.network.tlsrecord import new_tls

TD = "cluster.local"


def _store(ca: CertificateAuthority, sid: str) -> CertificateStore:
    s = CertificateStore()
    key, issued = ca.issue(sid, None)
    s.update(issued.cert_chain_pem, key, ca.trust_bundle_pem())
    return s


class _Server(asyncio.Protocol):
    def __init__(self, reply: bytes = b"") -> None:
        self.reply = reply

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t: Any = transport

    def data_received(self, data: bytes) -> None:
        self.t.write(self.reply or data)


class _Client(asyncio.Protocol):
    def __init__(self, done: asyncio.Future[None], rounds: int, msg: bytes) -> None:
        self.done, self.rounds, self.msg, self.n = done, rounds, msg, 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t: Any = transport

    def data_received(self, data: bytes) -> None:
        self.n += 1
        if self.n >= self.rounds:
            if not self.done.done():
                self.done.set_result(None)
        else:
            self.t.write(self.msg)


async def _pair(mode: str, server: Any, client: Any, sctx: Any, cctx: Any, lsock: Any) -> Any:
    """Connect ``client`` to ``server`` over ``mode``; returns the client's transport."""
    loop = asyncio.get_running_loop()
    port = lsock.getsockname()[1]
    accepted = loop.create_task(loop.sock_accept(lsock))
    if mode == "plain":
        t, _ = await loop.create_connection(lambda: client, "127.0.0.1", port)
        s, _ = await accepted
        await loop.connect_accepted_socket(lambda: server, s)
        return t
    if mode == "uvloop":
        ct = loop.create_task(loop.create_connection(lambda: client, "127.0.0.1", port, ssl=cctx))
        s, _ = await accepted
        await loop.connect_accepted_socket(lambda: server, s, ssl=sctx)
        t, _ = await ct
        return t
    layer, waiter = new_tls(loop, cctx, client, False)
    await loop.create_connection(lambda: layer, "127.0.0.1", port)
    s, _ = await accepted
    slayer, swaiter = new_tls(loop, sctx, server, True)
    await loop.connect_accepted_socket(lambda: slayer, s)
    await waiter
    await swaiter
    return layer


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1])
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=20000, help="echo round trips per run")
    ap.add_argument("--repeat", type=int, default=3, help="runs per mode, alternated")
    ap.add_argument("--idle", type=int, default=0, help="measure RSS of N idle connections instead")
    ap.add_argument(
        "--mode",
        choices=("uvloop", "tlsrecord"),
        default="tlsrecord",
        help="the TLS transport for --idle",
    )
    args = ap.parse_args()
    ca = CertificateAuthority.generate(trust_domain=TD)
    sstore = _store(ca, f"spiffe://{TD}/ns/default/sa/server")
    cstore = _store(ca, f"spiffe://{TD}/ns/default/sa/client")
    msg = b"x" * 250

    async def echo(mode: str) -> float:
        sctx, cctx = sstore.server_context(True), cstore.client_context()
        lsock = socket.socket()
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1024)
        lsock.setblocking(False)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        t = await _pair(mode, _Server(), _Client(done, args.rounds, msg), sctx, cctx, lsock)
        c0 = _cpu()
        t.write(msg)
        await done
        c1 = _cpu()
        t.close()
        lsock.close()
        return (c1 - c0) / args.rounds * 1e6

    async def idle(mode: str) -> float:
        sctx, cctx = sstore.server_context(True), cstore.client_context()
        lsock = socket.socket()
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1024)
        lsock.setblocking(False)
        keep = []

        async def one() -> None:
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            t = await _pair(mode, _Server(b"r" * 300), _Client(done, 1, msg), sctx, cctx, lsock)
            t.write(b"q" * 200)
            await done
            keep.append(t)

        for _ in range(20):
            await one()
        await asyncio.sleep(0.2)
        gc.collect()
        r0 = _rss_kib()
        for _ in range(args.idle):
            await one()
        await asyncio.sleep(0.5)
        gc.collect()
        lsock.close()
        return (_rss_kib() - r0) / args.idle

    if args.idle:
        kib = uvloop.run(idle(args.mode))
        print(f"{args.mode}: {kib:.1f} KiB RSS per idle mTLS connection pair (both ends)")
        return 0
    results: dict[str, list[float]] = {"plain": [], "uvloop": [], "tlsrecord": []}
    for _ in range(args.repeat):
        for mode in results:
            results[mode].append(uvloop.run(echo(mode)))
    for mode, runs in results.items():
        print(f"{mode:9s} µs CPU per round trip: " + " ".join(f"{r:.1f}" for r in runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
