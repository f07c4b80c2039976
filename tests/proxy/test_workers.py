"""``concurrency: N``: a sidecar serving with N worker processes (diktyo.proxy.workers).

Real sidecar processes (``diktyo sidecar --concurrency 2``) in front of real upstream servers
on 127.0.0.1: the workers both serve, one scrape returns the sidecar's totals, circuit-breaker
limits hold for the sidecar as a whole (counted at the upstream), a crashed worker is restarted,
workers die with the sidecar, and a pushed snapshot is ACKed only once every worker serves it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from diktyo.proxy.upstream.circuit_breaker import CircuitBreaker
from diktyo.proxy.upstream.shared_breaker import SharedCounts, is_shared, shared_circuit_breaker
from diktyo.proxy.workers import merge_prometheus, resolve_concurrency
from diktyo.snapshot.codec import encode
from diktyo.snapshot.model import ConnectionPool
from diktyo.testing import (
    FakeUpstream,
    RecordedRequest,
    Response,
    http_request,
    http_snapshot,
    reviews_by_user,
)
from diktyo.testing.client import HttpClient
from diktyo.testing.sidecar import start_sidecar_process
from diktyo.testing.wait import eventually

# promtool's lint findings on names Istio and Envoy chose (as tests/telemetry accept them)
ACCEPTED_LINT = (
    re.compile(r'^istio_request_duration_milliseconds use base unit "seconds"'),
    re.compile(r'^envoy_(cluster|http)_[a-z0-9_]+ counter metrics should have "_total" suffix$'),
)
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def get(port: int, path: str) -> str:
    with _opener.open(f"http://127.0.0.1:{port}{path}", timeout=15) as r:
        body: bytes = r.read()
        return body.decode()


async def aget(port: int, path: str) -> str:
    return await asyncio.to_thread(get, port, path)


def sample(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        head, _, value = line.rpartition(" ")
        if not (head == name or head.startswith(name + "{")):
            continue
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


class CountingUpstream:
    """An HTTP/1.1 server that counts its open connections and remembers the peak."""

    def __init__(self, delay: float = 0.0, body: bytes = b"ok") -> None:
        self.delay = delay
        self.body = body
        self.open = 0
        self.peak = 0
        self.total = 0
        self.requests = 0
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open += 1
        self.total += 1
        self.peak = max(self.peak, self.open)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.requests += 1
                if self.delay:
                    await asyncio.sleep(self.delay)
                close = b"connection: close" in head.lower()
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%s\r\n%s"
                    % (len(self.body), b"connection: close\r\n" if close else b"", self.body)
                )
                await writer.drain()
                if close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.open -= 1
            writer.close()

    async def __aenter__(self) -> CountingUpstream:
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


def workers_of(admin: int) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = json.loads(get(admin, "/workers"))["workers"]
    return found


# ------------------------------------------------------------------ no processes


def test_concurrency_follows_istio_semantics() -> None:
    assert resolve_concurrency(None) == 1  # diktyo's default (docs/decisions.md)
    assert resolve_concurrency(2) == 2
    assert resolve_concurrency(0) == len(os.sched_getaffinity(0))  # 0 = every core
    with pytest.raises(ValueError, match="concurrency -1"):
        resolve_concurrency(-1)


def test_merge_sums_every_sample_and_keeps_families_grouped() -> None:
    leader = (
        "# HELP istio_requests_total Requests.\n# TYPE istio_requests_total counter\n"
        'istio_requests_total{code="200"} 3\n'
        "# HELP d_ms Duration.\n# TYPE d_ms histogram\n"
        'd_ms_bucket{le="1"} 1\nd_ms_bucket{le="+Inf"} 3\nd_ms_sum 2.5\nd_ms_count 3\n'
        "# HELP diktyo_proxy_config_applied_total Pushes.\n"
        "# TYPE diktyo_proxy_config_applied_total counter\ndiktyo_proxy_config_applied_total 2\n"
    )
    worker = (
        "# HELP istio_requests_total Requests.\n# TYPE istio_requests_total counter\n"
        'istio_requests_total{code="200"} 4\nistio_requests_total{code="503"} 1\n'
        "# HELP d_ms Duration.\n# TYPE d_ms histogram\n"
        'd_ms_bucket{le="1"} 0\nd_ms_bucket{le="+Inf"} 5\nd_ms_sum 7.25\nd_ms_count 5\n'
        "# HELP diktyo_proxy_config_applied_total Pushes.\n"
        "# TYPE diktyo_proxy_config_applied_total counter\ndiktyo_proxy_config_applied_total 2\n"
    )
    merged = merge_prometheus([leader, worker])
    assert sample(merged, "istio_requests_total", code="200") == 7
    assert sample(merged, "istio_requests_total", code="503") == 1
    assert sample(merged, "d_ms_bucket", le="+Inf") == 8
    assert sample(merged, "d_ms_sum") == 9.75
    assert sample(merged, "d_ms_count") == 8
    assert sample(merged, "diktyo_proxy_config_applied_total") == 2  # the leader's own
    lines = merged.splitlines()
    # the worker-only series sits inside its family, before the next family's HELP
    assert lines.index('istio_requests_total{code="503"} 1') < lines.index("# HELP d_ms Duration.")
    assert merged.count("# TYPE istio_requests_total counter") == 1


def test_shared_breaker_limits_hold_across_workers() -> None:
    pool = ConnectionPool(max_connections=1, http1_max_pending_requests=1, http2_max_requests=2,
                          max_retries=1)  # fmt: skip
    a = SharedCounts.create(2)
    b = SharedCounts(a.fd, 1, 2)
    try:
        row = a.row("c", assign=True)
        assert row is not None
        b.rows.update(a.rows)
        wa = shared_circuit_breaker(pool, "DestinationRule default/c", a, row)
        wb = shared_circuit_breaker(pool, "DestinationRule default/c", b, row)
        assert wa.can_open_connection()
        wa.connection_opened()  # consumes the reservation: counted once
        assert wa.total(0) == 1 and wa.connections == 1
        assert not wb.can_open_connection()  # the other worker holds the only one
        assert wb.counters["upstream_cx_overflow"] == 1
        assert wb.overflow_message("connections").startswith("circuit breaker open: 1 of 1")
        assert wb.is_open("connections") and wb.describe()["current"]["connections"] == 1
        assert wa.try_start_request() and wb.try_start_request()
        assert not wb.try_start_request()  # 2 of 2 across both
        wa.end_request()
        assert wb.try_start_request()
        assert wa.try_enter_pending() and not wb.try_enter_pending()
        assert wb.try_start_retry() and not wa.try_start_retry()  # maxRetries: 1 in flight
        assert wa.counters["upstream_rq_retry_overflow"] == 1
        wb.end_retry()
        assert wa.try_start_retry()
        wa.connection_closed()
        assert wb.can_open_connection()
        wb.connection_opened()
        a.clear_worker(1)  # worker 1 died: its connection and requests are gone
        assert wa.total(0) == 0 and wa.total(2) == 0
        # Istio's defaults (2^32-1): admitted without the lock, still counted in the total
        free = shared_circuit_breaker(ConnectionPool(), "", a, row)
        assert free.try_start_request() and free.total(2) == 1
        assert isinstance(free, CircuitBreaker) and is_shared(free)
        assert not is_shared(CircuitBreaker(ConnectionPool(), ""))
    finally:
        b.close()
        a.close()
        os.close(a.fd)


# ------------------------------------------------------------------ real sidecars


@pytest.fixture
async def counting() -> AsyncIterator[CountingUpstream]:
    async with CountingUpstream(delay=0.02) as up:
        yield up


async def _load(port: int, connections: int, per_connection: int, host: str = "svc") -> list[int]:
    """``connections`` keep-alive clients at once, each sending ``per_connection`` requests."""

    async def one() -> list[int]:
        codes = []
        async with HttpClient(port, timeout=15) as c:
            for _ in range(per_connection):
                r = await c.request("GET", f"http://{host}/")
                codes.append(r.status)
        return codes

    out = await asyncio.gather(*(one() for _ in range(connections)))
    return [c for codes in out for c in codes]


async def test_two_workers_serve_and_one_scrape_sums_them(counting: CountingUpstream) -> None:
    snap = http_snapshot({"svc": [("127.0.0.1", counting.port)]})
    async with start_sidecar_process(snap, "--concurrency", "2") as h:
        assert len(h.extra["workers"]) == 2
        codes = await _load(h.port(), connections=16, per_connection=5)
        assert codes == [200] * 80
        workers = await asyncio.to_thread(workers_of, h.admin)
        served = [w["downstream_rq_total"] for w in workers]
        assert sum(served) == 80 and all(n > 0 for n in served), workers
        text = await aget(h.admin, "/stats/prometheus")
        assert sample(text, "istio_requests_total", response_code="200") == 80
        assert sample(text, "envoy_http_downstream_rq_total") == 80
        assert text.count("# TYPE istio_requests_total counter") == 1
        promtool = shutil.which("promtool")
        if promtool is not None:  # Debian's prometheus package
            res = subprocess.run([promtool, "check", "metrics"], input=text, text=True,
                                 capture_output=True, check=False)  # fmt: skip
            assert res.returncode in (0, 3), res.stderr  # 1 = the exposition does not parse
            problems = [ln for ln in (res.stdout + res.stderr).splitlines()
                        if ln.strip() and not any(p.match(ln) for p in ACCEPTED_LINT)]  # fmt: skip
            assert problems == [], problems


async def test_workers_load_no_optional_module_an_idle_sidecar_does_not(
    counting: CountingUpstream,
) -> None:
    """A worker process is as lean as a single sidecar: after serving HTTP/1.1 it has loaded
    none of the optional libraries (admin /memory's list; /workers shows it per process). It
    used to import typing_extensions with msgspec (0.3 MiB per worker; stop 21, tidy)."""
    snap = http_snapshot({"svc": [("127.0.0.1", counting.port)]})
    async with start_sidecar_process(snap, "--concurrency", "2") as h:
        codes = await _load(h.port(), connections=8, per_connection=2)
        assert codes == [200] * 16
        workers = await asyncio.to_thread(workers_of, h.admin)
        assert len(workers) == 2
        assert [w["optional_modules_loaded"] for w in workers] == [[], []], workers


async def test_max_connections_one_holds_for_the_whole_sidecar(counting: CountingUpstream) -> None:
    pool = {"max_connections": 1, "http1_max_pending_requests": 1000}
    snap = http_snapshot({"svc": [("127.0.0.1", counting.port)]}, clusters={"svc": {"pool": pool}})
    async with start_sidecar_process(snap, "--concurrency", "2") as h:
        codes = await _load(h.port(), connections=12, per_connection=3)
        assert codes == [200] * 36  # queued, not refused: the pending queue is large
        workers = await asyncio.to_thread(workers_of, h.admin)
        assert all(w["downstream_rq_total"] > 0 for w in workers), workers
        # the limit is the sidecar's, not each worker's: at most Envoy's documented bound,
        # maxConnections + endpoints x connection pools (one per worker), never one per client
        assert counting.peak <= 1 + 1 * 2, (counting.peak, counting.total)
        assert counting.requests == 36


async def _istio_task(concurrency: int, up: CountingUpstream) -> tuple[list[int], str]:
    # Istio's circuit-breaking task: one connection, one pending request, one request per
    # connection
    pool = {"max_connections": 1, "http1_max_pending_requests": 1, "max_requests_per_connection": 1}
    snap = http_snapshot({"svc": [("127.0.0.1", up.port)]}, clusters={"svc": {"pool": pool}})
    async with start_sidecar_process(snap, "--concurrency", str(concurrency)) as h:
        codes = await _load(h.port(), connections=3, per_connection=10)
        return codes, await aget(h.admin, "/stats/prometheus")


async def test_istio_circuit_breaking_task_overflows_as_with_one_worker() -> None:
    for concurrency in (1, 2):
        async with CountingUpstream(delay=0.02) as up:
            codes, text = await _istio_task(concurrency, up)
            assert set(codes) <= {200, 503} and len(codes) == 30, codes
            rejected = codes.count(503)
            assert rejected >= 1, (concurrency, codes)  # three in flight always overflow
            assert codes.count(200) >= 1, (concurrency, codes)
            cluster = "outbound|80||svc"
            overflow = sample(text, "envoy_cluster_upstream_rq_pending_overflow",
                              cluster_name=cluster)  # fmt: skip
            assert overflow == rejected, (concurrency, overflow, rejected)
            uo = sample(text, "istio_requests_total", response_code="503", response_flags="UO")
            assert uo == rejected
            # Envoy's bound: maxConnections + endpoints x pools (one pool per worker)
            assert up.peak <= 1 + concurrency and up.requests == codes.count(200), (
                concurrency,
                up.peak,
            )


async def test_crashed_worker_is_restarted_and_workers_die_with_the_sidecar(
    counting: CountingUpstream,
) -> None:
    snap = http_snapshot({"svc": [("127.0.0.1", counting.port)]})
    async with start_sidecar_process(snap, "--concurrency", "2") as h:
        leader, worker = h.extra["workers"]
        os.kill(worker, signal.SIGKILL)

        async def restarted() -> list[dict[str, Any]] | None:
            ws = await asyncio.to_thread(workers_of, h.admin)
            ok = ws[1]["pid"] != worker and ws[1]["alive"] and ws[1]["version"] == "1"
            return ws if ok else None

        ws = await eventually(restarted, timeout=20, what="worker 1 restarted")
        codes = await _load(h.port(), connections=8, per_connection=2)
        assert codes == [200] * 16
        new = ws[1]["pid"]
        h.process.send_signal(signal.SIGKILL)  # the leader dies without draining anything
        await h.process.wait()

        def gone() -> bool:
            return not os.path.exists(f"/proc/{new}") or _zombie(new)

        await eventually(gone, timeout=10, what="the worker exits with the leader")
    assert h.process.returncode == -signal.SIGKILL


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


async def test_crash_is_logged_and_sigterm_drains_every_worker(counting: CountingUpstream) -> None:
    snap = http_snapshot({"svc": [("127.0.0.1", counting.port)]})
    async with start_sidecar_process(snap, "--concurrency", "2", "--log-level", "info") as h:
        _, worker = h.extra["workers"]
        os.kill(worker, signal.SIGKILL)
        await eventually(lambda: _restarted(h.admin, worker), timeout=20, what="restart")
        new = workers_of(h.admin)[1]["pid"]
        h.process.terminate()
        _, err = await asyncio.wait_for(h.process.communicate(), 20)
        assert h.process.returncode == 0  # drained and exited cleanly
        assert not os.path.exists(f"/proc/{new}") or _zombie(new)  # the worker drained too
    log = err.decode()
    assert f"worker 1 (pid {worker}): it exited (killed by SIGKILL); restarting it" in log, log
    assert "did not exit after draining" not in log


def _restarted(admin: int, old: int) -> bool:
    ws = workers_of(admin)
    return bool(ws[1]["pid"] != old and ws[1]["version"])


async def test_rejected_push_reaches_no_worker_and_v1_keeps_serving() -> None:
    """A snapshot the leader rejects is NACKed and never sent to the workers: every worker
    keeps serving v1."""
    async with FakeUpstream(Response(body=b"A")) as a:
        good = encode(http_snapshot({"svc": [("127.0.0.1", a.port)]}, version="1"))
        # a second listener on a port that is taken (the upstream's): the leader cannot bind
        busy = {"name": "busy", "direction": "outbound", "address": "127.0.0.1",
                "port": a.port, "route_table": "outbound"}  # fmt: skip
        bad = encode(http_snapshot({"svc": [("127.0.0.1", a.port)]}, listeners=[busy],
                                   version="2"))  # fmt: skip
        bodies = {"1": good, "2": bad}
        current = ["1"]

        def cp(req: RecordedRequest) -> Response:
            if req.path.startswith("/v1/snapshot"):
                v = current[0]
                if f"version={v}" in req.path:
                    return Response(status=204, body=b"", delay=0.2)
                return Response(body=bodies[v], headers={
                    "content-type": "application/json", "x-diktyo-version": v})  # fmt: skip
            return Response(body=b"{}", headers={"content-type": "application/json"})

        async with FakeUpstream(handler=cp) as plane:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "diktyo.proxy", "--concurrency", "2",
                "--control-plane", f"http://127.0.0.1:{plane.port}", "--node", "test.default",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            try:
                assert proc.stdout is not None
                ready = json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))
                current[0] = "2"

                def nacked() -> bool:
                    acks = [json.loads(q.body) for q in plane.requests if q.path == "/v1/ack"]
                    return any(x["version"] == "2" and not x["ok"] for x in acks)

                await eventually(nacked, timeout=20, what="NACK of v2")
                acks = [json.loads(q.body) for q in plane.requests if q.path == "/v1/ack"]
                assert "cannot bind" in next(x for x in acks if x["version"] == "2")["error"]
                ws = await asyncio.to_thread(workers_of, ready["admin"])
                assert [w["version"] for w in ws] == ["1", "1"], ws
                codes = await _load(ready["listeners"]["outbound"], connections=8,
                                    per_connection=2)  # fmt: skip
                assert codes == [200] * 16
            finally:
                proc.terminate()
                await asyncio.wait_for(proc.communicate(), 20)


async def test_push_under_load_is_acked_once_every_worker_serves_it() -> None:
    """Snapshot v1 routes to upstream A and sets ``x-v: 1``; v2 routes to B with ``x-v: 2``.
    Under load, every response is whole (A with 1, or B with 2), and once the control plane has
    the ACK of v2 no request is served by v1 any more, in any worker."""
    async with FakeUpstream(Response(body=b"A")) as a, FakeUpstream(Response(body=b"B")) as b:

        def snap(version: str, port: int, tag: str) -> bytes:
            route = {"name": "r", "clusters": [{"cluster": "outbound|80||svc", "host": "svc"}],
                     "headers": {"response": {"set": {"x-v": tag}}}}  # fmt: skip
            return encode(http_snapshot({"svc": [("127.0.0.1", port)]},
                                        routes={"svc": [route]}, version=version))  # fmt: skip

        bodies = {"1": snap("1", a.port, "1"), "2": snap("2", b.port, "2")}
        current = ["1"]

        def cp(req: RecordedRequest) -> Response:
            if req.path.startswith("/v1/snapshot"):
                v = current[0]
                if f"version={v}" in req.path:
                    return Response(status=204, body=b"", delay=0.2)
                return Response(body=bodies[v], headers={
                    "content-type": "application/json", "x-diktyo-version": v})  # fmt: skip
            return Response(body=b"{}", headers={"content-type": "application/json"})

        async with FakeUpstream(handler=cp) as plane:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "diktyo.proxy", "--concurrency", "2",
                "--control-plane", f"http://127.0.0.1:{plane.port}", "--node", "test.default",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            try:
                assert proc.stdout is not None
                ready = json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))
                port = ready["listeners"]["outbound"]
                seen: list[tuple[bytes, str]] = []
                after: list[tuple[bytes, str]] = []  # requests sent after the v2 ACK arrived
                stop = asyncio.Event()
                acked = [False]

                async def client() -> None:
                    async with HttpClient(port, timeout=15) as c:
                        while not stop.is_set():
                            late = acked[0]
                            r = await c.request("GET", "http://svc/")
                            got = (r.body, r.header("x-v") or "")
                            seen.append(got)
                            if late:
                                after.append(got)

                load = [asyncio.create_task(client()) for _ in range(8)]
                # load runs on v1 before the change (a loaded machine answers later: wait)
                await eventually(lambda: (b"A", "1") in seen, timeout=20, what="answers on v1")
                current[0] = "2"

                def acked_v2() -> bool:
                    acks = [json.loads(q.body) for q in plane.requests if q.path == "/v1/ack"]
                    acked[0] = any(x["version"] == "2" and x["ok"] for x in acks)
                    return acked[0]

                await eventually(acked_v2, timeout=20, interval=0.002, what="ACK of v2")
                # load keeps running after the ACK: answers to requests sent after it
                await eventually(lambda: len(after) >= 8, timeout=20, what="answers after the ACK")
                stop.set()
                await asyncio.gather(*load)
                fresh = [(await http_request(port, "GET", "http://svc/")) for _ in range(10)]
            finally:
                proc.terminate()
                await asyncio.wait_for(proc.communicate(), 20)
        assert set(seen) <= {(b"A", "1"), (b"B", "2")}, set(seen)  # never a mix
        assert (b"A", "1") in seen and (b"B", "2") in seen
        assert after and set(after) == {(b"B", "2")}, set(after)
        assert all((r.body, r.header("x-v")) == (b"B", "2") for r in fresh)


async def test_standalone_config_dir_with_concurrency_from_the_env(tmp_path: Path) -> None:
    """``DIKTYO_CONCURRENCY=2 diktyo sidecar --config DIR``: both workers route by the
    VirtualService of the directory."""
    async with FakeUpstream(Response(body=b"v1")) as v1, FakeUpstream(Response(body=b"v2")) as v2:
        (tmp_path / "mesh.yaml").write_text(reviews_by_user(v1.port, v2.port))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "diktyo.cli.main", "sidecar", "--config", str(tmp_path),
            "--outbound-port", "0", stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env={**os.environ, "DIKTYO_CONCURRENCY": "2"},
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            ready = json.loads(await asyncio.wait_for(proc.stdout.readline(), 60))
            assert len(ready["workers"]) == 2
            port = ready["listeners"]["outbound"]

            async def one(i: int) -> bytes:
                headers = {"end-user": "jason"} if i % 2 else {}
                r = await http_request(port, "GET", "http://reviews:9080/r", headers)
                return r.body

            bodies = await asyncio.gather(*(one(i) for i in range(24)))
            assert bodies == [b"v2" if i % 2 else b"v1" for i in range(24)]
            ws = await asyncio.to_thread(workers_of, ready["admin"])
            assert all(w["downstream_rq_total"] > 0 for w in ws), ws
        finally:
            proc.terminate()
            await asyncio.wait_for(proc.communicate(), 20)


async def test_a_port_another_reuseport_group_holds_is_refused(counting: CountingUpstream) -> None:
    """SO_REUSEPORT would let a sidecar with workers silently join a port another process of
    the same user serves with it (another sidecar with workers): it must fail to bind."""
    other = socket.socket()
    other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    other.bind(("127.0.0.1", 0))
    other.listen()
    port = other.getsockname()[1]
    try:
        snap = http_snapshot({"svc": [("127.0.0.1", counting.port)]})
        with pytest.raises(RuntimeError, match="cannot bind"):
            async with start_sidecar_process(snap, "--concurrency", "2",
                                             "--outbound-port", str(port)):  # fmt: skip
                pass
    finally:
        other.close()
