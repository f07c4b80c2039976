"""Worker processes: Istio's ``concurrency`` (a sidecar serving on N cores).

Theory of operation
-------------------
Envoy runs ``concurrency`` worker threads; diktyo's sidecar is Python, so it runs N
*processes*. The one started as the sidecar is the **leader** (worker 0): it does everything a
single-process sidecar does (admin port, control-plane client, certificates, status ports) and
serves traffic too. It starts workers 1..N-1 (``python -m diktyo.proxy.workers``) and talks
to each over two Unix socket pairs:

- **control**: length-prefixed msgpack frames. The leader sends ``apply`` (the snapshot it
  has just applied itself, the listener sockets as file descriptors, the breaker row table)
  and ``certs`` (the workload certificate, at start and on every rotation) and ``drain``;
  the worker answers ``applied``/``rejected`` with the version once it *serves* it.
- **stats**: the leader asks, the worker answers its ``/stats/prometheus`` text; the leader
  sums every sample (``merge_prometheus``), so one scrape returns the sidecar's totals.

Listeners: every process accepts on its own socket of the same port (``SO_REUSEPORT``): the
leader binds its listener sockets with it and, for each worker, binds one more per listener
and hands it over (``SCM_RIGHTS``), keeping no copy, so a worker that dies takes its socket
out of the port's group and the others get its share of new connections. We measured the
alternative, one socket bound once and inherited by all (one accept queue,
``DIKTYO_WORKER_SOCKETS=shared``): it split 50 ``wrk`` connections 42/8 in one run of two;
reuseport's hash gave 19/31 and 26/24 (``docs/performance.md``, "Workers").

Snapshots: the leader applies a snapshot first (a rejected one never reaches the workers),
then sends it to every worker and waits until every one answers that it serves it; only then
does the sidecar report the version (the ready line, the ACK to the control plane). Each
process swaps its runtime in one assignment, so a request sees one version whole. A worker
that rejects a snapshot the leader accepted (it should not happen: same code, same input) is
restarted, and the version is NACKed.

Circuit breakers: ``diktyo.proxy.upstream.shared_breaker`` (one shared memory file).

Lifetime: workers die with the leader (``PR_SET_PDEATHSIG`` and EOF on the control socket);
the leader restarts a worker that dies (logged, with its exit status; with a growing pause
if it keeps dying) and zeroes its breaker slots. Draining the sidecar drains every worker.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

from diktyo.proxy.memory import import_msgspec_lean, loaded_optional

# a worker process (``python -m diktyo.proxy.workers``) starts here: msgspec without
# typing_extensions, as ``python -m diktyo.proxy`` does for the leader (a no-op in the leader)
import_msgspec_lean()

import msgspec  # noqa: E402

from diktyo.proxy.network.listener import bind_listener  # noqa: E402
from diktyo.proxy.upstream import shared_breaker  # noqa: E402
from diktyo.proxy.upstream.circuit_breaker import PENDING  # noqa: E402
from diktyo.proxy.upstream.shared_breaker import MAX_WORKERS, SharedCounts, is_shared  # noqa: E402

if TYPE_CHECKING:
    import argparse

log = logging.getLogger("diktyo.proxy")

DEFAULT_CONCURRENCY = 1  # diktyo's default; Istio's sidecar default is 2 (docs/decisions.md)
_HEADER = struct.Struct("!I")
_MAX_FDS = 256
STATS_TIMEOUT = 2.0
APPLY_TIMEOUT = 30.0


def resolve_concurrency(value: int | None) -> int:
    """Istio's semantics: unset = the default, 0 = every core this process may run on."""
    if value is None:
        return DEFAULT_CONCURRENCY
    if value < 0:
        raise ValueError(f"concurrency {value}: expected 0 (all cores) or a number of workers")
    if value == 0:
        try:
            value = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):  # pragma: no cover
            value = os.cpu_count() or 1
    return min(value, MAX_WORKERS)


def _frame(obj: Any) -> bytes:
    body = msgspec.msgpack.encode(obj)
    return _HEADER.pack(len(body)) + body


class _Reader:
    """Frames (and passed file descriptors) from a stream socket, fed as it becomes readable."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.fds: list[int] = []

    def feed(self, sock: socket.socket) -> bool:
        """Read what is there; False at EOF."""
        try:
            data, fds, _, _ = socket.recv_fds(sock, 1 << 20, _MAX_FDS)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        self.fds.extend(fds)
        if not data:
            return False
        self.buf += data
        return True

    def frames(self) -> list[Any]:
        out = []
        while len(self.buf) >= 4:
            (n,) = _HEADER.unpack_from(self.buf)
            if len(self.buf) < 4 + n:
                break
            out.append(msgspec.msgpack.decode(bytes(self.buf[4 : 4 + n])))
            del self.buf[: 4 + n]
        return out


# ---------------------------------------------------------------------------- metrics


def merge_prometheus(texts: list[str], leader_only: tuple[str, ...] = ("diktyo_proxy_",)) -> str:
    """Sum Prometheus text expositions sample by sample (counters, gauges, histogram buckets,
    ``_sum`` and ``_count`` all add up across processes). Families are kept in the first
    text's order, series in order of first appearance; ``leader_only`` families (the
    sidecar's own config counters) come from the first text alone."""
    families: dict[str, tuple[list[str], dict[str, float]]] = {}
    order: list[str] = []
    for i, text in enumerate(texts):
        fam = ""
        for line in text.splitlines():
            if not line:
                continue
            if line.startswith("#"):
                parts = line.split(" ", 3)
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                    fam = parts[2]
                    if fam not in families:
                        families[fam] = ([], {})
                        order.append(fam)
                    meta = families[fam][0]  # one HELP and one TYPE, the first text's
                    if not any(m.split(" ", 2)[1] == parts[1] for m in meta):
                        meta.append(line)
                continue
            if i > 0 and fam.startswith(leader_only):
                continue
            key, _, value = line.rpartition(" ")
            if fam not in families:
                families[fam] = ([], {})
                order.append(fam)
            samples = families[fam][1]
            try:
                v = float(value)
            except ValueError:
                continue
            samples[key] = samples.get(key, 0.0) + v
    out: list[str] = []
    for fam in order:
        meta, samples = families[fam]
        out.extend(m + "\n" for m in meta)
        for key, v in samples.items():
            out.append(f"{key} {_num(v)}\n")
    return "".join(out)


def _num(v: float) -> str:
    if v == int(v) and abs(v) < 1e15:
        return str(int(v))
    return repr(v)


# ---------------------------------------------------------------------------- pools


NUDGE_BUSY = 0.005  # seconds between checks while requests wait for a connection
NUDGE_IDLE = 0.05


def nudge_pools(sidecar: Any) -> bool:
    """What a pool cannot see from its own process, checked on a short timer.

    A pool retries opening a connection for its pending requests when one of *its*
    connections closes. With workers the slot may be freed by another process, so a pool
    with pending requests retries when the shared total has room. And a worker parking an
    idle connection at the limit closes it when another worker's requests are pending (as a
    single pool closes an idle connection of another host to make room). Returns True while
    anything waits (the timer then runs fast)."""
    busy = False
    for pool in list(sidecar.pools.values()):
        br = pool.state.breaker
        if not is_shared(br):
            continue
        pending = getattr(pool, "pending", None)
        if pending:
            busy = True
            if br.connection_capacity():
                serve = getattr(pool, "_serve_pending", None)  # HTTP/1.1
                if serve is not None:
                    serve()
                maybe_open = getattr(pool, "_maybe_open", None)  # HTTP/2
                if maybe_open is not None:
                    for host in {id(h): h for _, h in list(pending)}.values():
                        maybe_open(host)
        idle = getattr(pool, "idle", None)
        if idle and br.total(PENDING) > br.pending and not br.connection_capacity():
            for conns in idle.values():
                if conns:
                    conns.pop(0).close()
                    busy = True
                    break
    return busy


class Nudger:
    """Runs ``nudge_pools`` every few milliseconds while requests wait, else every 50 ms."""

    def __init__(self, sidecar: Any) -> None:
        self.sidecar = sidecar
        self.handle: asyncio.TimerHandle | None = sidecar.loop.call_later(NUDGE_IDLE, self.tick)

    def tick(self) -> None:
        if self.sidecar.stopped.is_set():
            self.handle = None
            return
        try:
            busy = nudge_pools(self.sidecar)
        except Exception:  # noqa: BLE001 - never let the timer die
            log.exception("worker pool check failed")
            busy = False
        self.handle = self.sidecar.loop.call_later(NUDGE_BUSY if busy else NUDGE_IDLE, self.tick)

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None


# ---------------------------------------------------------------------------- leader side


class _Worker:
    """The leader's handle on one worker process."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: subprocess.Popen[bytes] | None = None
        self.ctrl: socket.socket | None = None
        self.stats: socket.socket | None = None
        self.reader = _Reader()
        self.waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.version = ""  # the version it serves
        self.given: dict[str, int] = {}  # listener name -> id() of the leader socket it mirrors
        self.started = 0.0
        self.restarts = 0
        self.stats_seq = 0
        self.hello: asyncio.Future[None] | None = None  # set once it reads its control socket
        self.modules: list[str] = []  # its optional modules loaded (memory.OPTIONAL_MODULES)


class Workers:
    """Starts, feeds, supervises and drains the worker processes of one sidecar (the leader)."""

    def __init__(self, sidecar: Any, count: int, settings: dict[str, Any] | None = None) -> None:
        self.sidecar = sidecar
        self.loop: asyncio.AbstractEventLoop = sidecar.loop
        self.count = count
        self.settings = dict(settings or {})
        self.shared = SharedCounts.create(count)
        shared_breaker.SHARED = self.shared
        shared_breaker.ASSIGN_ROWS = True
        self.workers = [_Worker(i) for i in range(1, count)]
        self.seq = 0
        self.snapshot_frame: bytes | None = None  # the last applied snapshot, encoded
        self.certs: tuple[str, str, str] | None = None
        self.certs_version = -1
        self.stopping = False
        self.draining_timeout: float | None = None
        sidecar.stats.merge = self.merged_metrics
        sidecar.on_drain.append(self.drain)
        self.nudger = Nudger(sidecar)
        # how workers get listener sockets (docs/performance.md, "Workers"): "reuseport" = one
        # SO_REUSEPORT socket per worker, "shared" = the leader's socket, one accept queue
        self.sockets = os.environ.get("DIKTYO_WORKER_SOCKETS", "reuseport")
        if self.sockets not in ("reuseport", "shared"):
            raise ValueError(f"DIKTYO_WORKER_SOCKETS={self.sockets!r}: expected reuseport or shared")
        if self.sockets == "reuseport":
            sidecar.listener_socket = _bind_reuseport
        store = getattr(sidecar, "certs", None)
        if store is not None:  # mTLS: workers need the workload certificate too
            self.watch_certs(store)

    # -- starting
    def watch_certs(self, store: Any) -> None:
        """Forward the workload certificate to the workers now and after every rotation
        (checked each second: rotation happens long before expiry)."""
        bundle = store.bundle
        if bundle is not None and store.version != self.certs_version:
            self.certs_version = store.version
            self.certs = (bundle.cert_chain_pem, bundle.key_pem, bundle.trust_bundle_pem)
            chain, key, trust = self.certs
            for w in self.workers:
                self._send(w, {"op": "certs", "chain": chain, "key": key, "bundle": trust})
        if not self.stopping:
            self.loop.call_later(1.0, self.watch_certs, store)

    def start(self) -> None:
        for w in self.workers:
            self._spawn(w)

    def _spawn(self, w: _Worker) -> None:
        ctrl, ctrl_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        stats, stats_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        argv = [
            sys.executable, "-m", "diktyo.proxy.workers",
            "--index", str(w.index), "--workers", str(self.count),
            "--ctrl-fd", str(ctrl_child.fileno()), "--stats-fd", str(stats_child.fileno()),
            "--shm-fd", str(self.shared.fd), "--leader", str(os.getpid()),
            "--settings", json.dumps(self.settings),
        ]  # fmt: skip
        fds = (ctrl_child.fileno(), stats_child.fileno(), self.shared.fd)
        w.proc = subprocess.Popen(argv, pass_fds=fds, stdin=subprocess.DEVNULL)
        ctrl_child.close()
        stats_child.close()
        ctrl.settimeout(10.0)  # sends block at most this long (a stuck worker)
        stats.settimeout(STATS_TIMEOUT)
        w.ctrl, w.stats = ctrl, stats
        w.reader = _Reader()
        w.started = time.monotonic()
        w.version = ""
        w.given = {}
        w.hello = self.loop.create_future()
        self.loop.add_reader(ctrl.fileno(), self._on_readable, w)
        log.info("worker %d started (pid %d)", w.index, w.proc.pid)
        if self.certs is not None:
            chain, key, bundle = self.certs
            self._send(w, {"op": "certs", "chain": chain, "key": key, "bundle": bundle})

    def _send(self, w: _Worker, msg: dict[str, Any], fds: list[int] | None = None) -> bool:
        if w.ctrl is None:
            return False
        data = _frame(msg)
        try:
            if fds:
                sent = socket.send_fds(w.ctrl, [data[:4]], fds)
                w.ctrl.sendall(data[sent:])
            else:
                w.ctrl.sendall(data)
        except OSError as exc:
            log.warning("worker %d: cannot send %s: %s", w.index, msg.get("op"), exc)
            return False
        return True

    # -- snapshots
    async def push(self, timeout: float = APPLY_TIMEOUT) -> None:
        """Send the leader's current snapshot to every worker; return when all serve it.
        Raises RuntimeError naming the workers that rejected it or did not answer."""
        rt = self.sidecar.rt
        if rt is None:
            return
        from diktyo.snapshot.codec import encode

        self.snapshot_frame = encode(rt.snapshot)
        # a worker still starting reads nothing yet: a snapshot larger than the socket buffer
        # would block the leader's loop in sendall, so wait for its hello first
        starting = [w.hello for w in self.workers if w.hello is not None and not w.hello.done()]
        if starting:
            await asyncio.wait(starting, timeout=timeout)
        waits = [(w, self._apply(w)) for w in self.workers if w.ctrl is not None]
        if not waits:
            return
        done, _ = await asyncio.wait([f for _, f in waits], timeout=timeout)
        problems = []
        for w, f in waits:
            if f not in done:
                f.cancel()
                problems.append(f"worker {w.index} did not answer within {timeout:g}s")
                continue
            res = f.result()
            if res.get("op") != "applied":
                problems.append(f"worker {w.index}: {res.get('error', res)}")
                self._restart(w, "it rejected a snapshot the leader serves")
        if problems:
            raise RuntimeError("snapshot not applied by every worker: " + "; ".join(problems))

    def _apply(self, w: _Worker) -> asyncio.Future[dict[str, Any]]:
        fut: asyncio.Future[dict[str, Any]] = self.loop.create_future()
        if self.snapshot_frame is None:
            fut.set_result({"op": "applied"})
            return fut
        self.seq += 1
        seq = self.seq
        names, socks = self._sockets_for(w)
        w.waiting[seq] = fut
        msg = {
            "op": "apply", "seq": seq, "snapshot": self.snapshot_frame,
            "rows": self.shared.rows, "listeners": names,
        }  # fmt: skip
        if not self._send(w, msg, [s.fileno() for s in socks]):
            w.waiting.pop(seq, None)
            fut.set_result({"op": "rejected", "error": "the worker is not reachable"})
        if self.sockets == "reuseport":
            for s in socks:  # the worker holds the only copy now: if it dies, its socket
                s.close()  # leaves the port's group and the others take its connections
        return fut

    def _sockets_for(self, w: _Worker) -> tuple[list[str], list[socket.socket]]:
        """The listener sockets worker ``w`` lacks: those the leader bound anew since the last
        push (a worker decides like the leader which listeners keep their socket)."""
        names: list[str] = []
        socks: list[socket.socket] = []
        current = {}
        for name, ctx in self.sidecar.listeners.items():
            sock = ctx.sock
            if sock is None or sock.fileno() < 0:
                continue
            current[name] = id(sock)
            if w.given.get(name) == id(sock):
                continue
            if self.sockets == "shared":
                mine = sock
            else:
                address, port = sock.getsockname()[:2]
                try:
                    mine = bind_listener(address, port, reuse_port=True)
                except OSError as exc:
                    log.warning("worker %d: cannot bind %s:%d for listener %s: %s",
                                w.index, address, port, name, exc)  # fmt: skip
                    continue
            names.append(name)
            socks.append(mine)
        w.given = current
        return names, socks

    def _on_readable(self, w: _Worker) -> None:
        assert w.ctrl is not None
        alive = w.reader.feed(w.ctrl)
        for fd in w.reader.fds:  # workers send none
            os.close(fd)
        w.reader.fds.clear()
        for msg in w.reader.frames():
            if msg.get("op") == "hello":
                if w.hello is not None and not w.hello.done():
                    w.hello.set_result(None)
            elif msg.get("op") in ("applied", "rejected"):
                if msg.get("op") == "applied":
                    w.version = msg.get("version", "")
                    w.modules = list(msg.get("modules", []))
                fut = w.waiting.pop(msg.get("seq", -1), None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
        if not alive:
            self._gone(w)

    def _gone(self, w: _Worker) -> None:
        """The worker's control socket closed: it exited (or is about to)."""
        self._close_channels(w)
        status: int | None = None
        if w.proc is not None:
            try:
                status = w.proc.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                w.proc.kill()
                status = w.proc.wait()
        self.shared.clear_worker(w.index)
        if w.hello is not None and not w.hello.done():
            w.hello.set_result(None)  # nobody waits for a dead worker's hello
        for fut in w.waiting.values():
            if not fut.done():
                fut.set_result({"op": "rejected", "error": f"worker exited (status {status})"})
        w.waiting.clear()
        if self.stopping:
            return
        why = _exit_reason(status)
        self._schedule_restart(w, f"it exited ({why})")

    def _restart(self, w: _Worker, why: str) -> None:
        if w.proc is not None and w.proc.poll() is None:
            w.proc.kill()  # its EOF brings us to _gone, which restarts it
            return
        self._schedule_restart(w, why)

    def _schedule_restart(self, w: _Worker, why: str) -> None:
        # a worker that keeps dying right after starting waits longer each time (max 10 s)
        quick = time.monotonic() - w.started < 5.0
        w.restarts = w.restarts + 1 if quick else 0
        delay = min(10.0, 0.1 * (2**w.restarts)) if quick else 0.0
        pid = w.proc.pid if w.proc is not None else 0
        log.warning("worker %d (pid %d): %s; restarting it in %.1fs", w.index, pid, why, delay)
        self.loop.call_later(delay, self._respawn, w)

    def _respawn(self, w: _Worker) -> None:
        if self.stopping or w.ctrl is not None:
            return
        self._spawn(w)
        if self.snapshot_frame is not None:
            task = self.loop.create_task(self._reapply(w))
            self.sidecar.tasks.add(task)
            task.add_done_callback(self.sidecar.tasks.discard)

    async def _reapply(self, w: _Worker) -> None:
        """A restarted worker gets the snapshot the leader serves, once it says hello."""
        if w.hello is not None:
            await asyncio.wait([w.hello], timeout=APPLY_TIMEOUT)
        res = await self._apply(w)
        if res.get("op") == "applied":
            log.info("worker %d serves snapshot %s again", w.index, w.version)
        else:
            log.warning("worker %d: %s", w.index, res.get("error", res))

    def _close_channels(self, w: _Worker) -> None:
        if w.ctrl is not None:
            try:
                self.loop.remove_reader(w.ctrl.fileno())
            except (ValueError, OSError):
                pass
            w.ctrl.close()
            w.ctrl = None
        if w.stats is not None:
            w.stats.close()
            w.stats = None

    # -- metrics
    def merged_metrics(self, own: str) -> str:
        """The leader's exposition plus every worker's, summed (blocks up to STATS_TIMEOUT
        per worker that does not answer; a scrape is rare next to requests)."""
        texts = [own]
        for w in self.workers:
            text = self._worker_metrics(w)
            if text is not None:
                texts.append(text)
        return merge_prometheus(texts)

    def _worker_metrics(self, w: _Worker) -> str | None:
        sock = w.stats
        if sock is None:
            return None
        w.stats_seq += 1
        seq = w.stats_seq
        deadline = time.monotonic() + STATS_TIMEOUT
        try:
            sock.sendall(_HEADER.pack(seq))
            while True:
                head = _recv_exact(sock, 8, deadline)
                got, n = struct.unpack("!II", head)
                body = _recv_exact(sock, n, deadline)
                if got == seq:
                    return body.decode()
                # an answer to an earlier request that timed out: skip it
        except (OSError, TimeoutError) as exc:
            log.warning("worker %d: no metrics (%s); this scrape lacks its counts", w.index, exc)
            return None

    # -- stopping
    def drain(self, timeout: float) -> None:
        """The sidecar drains: every worker stops accepting and finishes its requests."""
        self.stopping = True
        self.draining_timeout = timeout
        for w in self.workers:
            self._send(w, {"op": "drain", "timeout": timeout})

    async def stop(self, grace: float = 5.0) -> None:
        """Wait for the workers to exit (after ``drain``), then kill what is left."""
        self.stopping = True
        if self.draining_timeout is None:
            self.drain(0.0)
        deadline = time.monotonic() + (self.draining_timeout or 0.0) + grace
        for w in self.workers:
            proc = w.proc
            if proc is None:
                continue
            while proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            if proc.poll() is None:
                log.warning("worker %d (pid %d) did not exit after draining: killed",
                            w.index, proc.pid)  # fmt: skip
                proc.kill()
                proc.wait()
            self._close_channels(w)
        self.nudger.cancel()
        shared_breaker.SHARED = None
        shared_breaker.ASSIGN_ROWS = False

    def describe(self, detail: bool = False) -> list[dict[str, Any]]:
        """One entry per worker (0 = the leader); ``detail`` adds the downstream requests and
        connections each has served (asks every worker, like a scrape)."""
        sc = self.sidecar
        lead: dict[str, Any] = {"worker": 0, "pid": os.getpid(), "role": "leader", "alive": True,
                                "version": sc.rt.snapshot.version if sc.rt is not None else "",
                                "optional_modules_loaded": loaded_optional()}
        if detail:
            lead.update({k: sc.stats.server.get(k, 0) for k in _SERVED})
        out = [lead]
        for w in self.workers:
            alive = w.proc is not None and w.proc.poll() is None
            d: dict[str, Any] = {
                "worker": w.index, "pid": w.proc.pid if w.proc else None, "alive": alive,
                "version": w.version, "restarts": w.restarts,
                # as of the last snapshot it applied (admin /memory's list, per worker)
                "optional_modules_loaded": w.modules,
            }  # fmt: skip
            if detail:
                text = self._worker_metrics(w) if alive else None
                for k in _SERVED:
                    d[k] = _sample(text or "", "envoy_http_" + k)
            out.append(d)
        return out


_SERVED = ("downstream_rq_total", "downstream_cx_total")


def _sample(text: str, name: str) -> int:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return int(float(line.rsplit(" ", 1)[1]))
    return 0


def _bind_reuseport(name: str, address: str, port: int) -> socket.socket:
    """The leader's listener sockets, bound with SO_REUSEPORT so workers can join the port.

    A plain bind first: SO_REUSEPORT alone would silently *join* a port another process of
    the same user already serves with it (another sidecar with workers, a mistyped port),
    sharing its connections; the probe fails with EADDRINUSE instead, and port 0 gets a port
    nobody uses."""
    probe = bind_listener(address, port)
    port = probe.getsockname()[1]
    probe.close()
    return bind_listener(address, port, reuse_port=True)


def _recv_exact(sock: socket.socket, n: int, deadline: float) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out")
        sock.settimeout(left)
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise OSError("the worker closed its stats channel")
        buf += chunk
    return bytes(buf)


def _exit_reason(status: int | None) -> str:
    if status is None:
        return "status unknown"
    if status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return f"exit status {status}"


# ---------------------------------------------------------------------------- worker side


def _die_with_parent() -> None:
    """PR_SET_PDEATHSIG: the kernel sends SIGKILL when the leader dies."""
    import ctypes  # in workers only: ~0.4 MiB the leader of every sidecar need not pay (issue 11)

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass


async def _worker(args: argparse.Namespace) -> int:
    from diktyo.proxy.sidecar import Sidecar
    from diktyo.snapshot.codec import SnapshotError, decode

    loop = asyncio.get_running_loop()
    settings: dict[str, Any] = json.loads(args.settings or "{}")
    seed = settings.get("seed")
    sidecar = Sidecar(loop, seed=None if seed is None else int(seed) + args.index)
    for name in ("header_timeout", "accept_http_10", "access_log_buffer", "idle_timeout"):
        if name in settings:
            setattr(sidecar, name, settings[name])
    shared = SharedCounts(args.shm_fd, args.index, args.workers)
    shared_breaker.SHARED = shared
    shared_breaker.ASSIGN_ROWS = False
    ctrl = socket.socket(fileno=args.ctrl_fd)
    stats = socket.socket(fileno=args.stats_fd)
    ctrl.setblocking(False)
    stats.setblocking(False)
    handed: dict[str, socket.socket] = {}

    def listener_socket(name: str, address: str, port: int) -> socket.socket:
        sock = handed.pop(name, None)
        if sock is None:
            raise OSError(f"the leader sent no socket for listener {name}")
        sock.setblocking(False)
        return sock

    sidecar.listener_socket = listener_socket
    reader = _Reader()
    done = asyncio.Event()
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    frozen: list[bool] = []

    def reply(msg: dict[str, Any]) -> None:
        data = _frame(msg)
        ctrl.setblocking(True)
        try:
            ctrl.sendall(data)
        except OSError:
            done.set()
        finally:
            ctrl.setblocking(False)

    def on_ctrl() -> None:
        alive = reader.feed(ctrl)
        for msg in reader.frames():
            queue.put_nowait(msg)
        if not alive:
            log.warning("worker %d: the leader went away; exiting", args.index)
            done.set()

    def on_stats() -> None:
        try:
            data = stats.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            return
        for (seq,) in struct.iter_unpack("!I", data[: len(data) // 4 * 4]):
            clusters = sidecar.rt.clusters if sidecar.rt is not None else {}
            body = sidecar.stats.render_prometheus(clusters).encode()
            stats.setblocking(True)
            try:
                stats.sendall(struct.pack("!II", seq, len(body)) + body)
            except OSError:
                pass
            finally:
                stats.setblocking(False)

    async def handle() -> None:
        while True:
            msg = await queue.get()
            op = msg.get("op")
            if op == "certs":
                if sidecar.certs is None:
                    from diktyo.proxy.network.tls import CertificateStore

                    sidecar.certs = CertificateStore()
                    for pool in sidecar.pools.values():
                        pool.certs = sidecar.certs
                sidecar.certs.update(msg["chain"], msg["key"], msg["bundle"])
            elif op == "apply":
                names = msg.get("listeners", [])
                fds = reader.fds[: len(names)]
                del reader.fds[: len(names)]
                handed.clear()
                for name, fd in zip(names, fds, strict=False):
                    handed[name] = socket.socket(fileno=fd)
                shared.rows.update(msg.get("rows", {}))
                try:
                    snap = decode(msg["snapshot"])
                    sidecar.apply(snap)
                    await sidecar.wait_listening()
                except (SnapshotError, OSError, ValueError) as exc:
                    reply({"op": "rejected", "seq": msg.get("seq"), "error": str(exc)})
                else:
                    reply({"op": "applied", "seq": msg.get("seq"), "version": snap.version,
                           "modules": loaded_optional()})  # fmt: skip
                    if not frozen:  # as the leader: config objects leave the collector's view
                        frozen.append(True)
                        from diktyo.proxy.memory import settle_gc

                        settle_gc()
                for s in handed.values():  # sockets of listeners it already serves
                    s.close()
                handed.clear()
            elif op == "drain":
                await sidecar.drain(float(msg.get("timeout", 0.0)))
                done.set()
                return

    loop.add_reader(ctrl.fileno(), on_ctrl)
    loop.add_reader(stats.fileno(), on_stats)
    reply({"op": "hello"})
    for sig in (signal.SIGTERM, signal.SIGINT):  # the leader drains us; the group's signal
        loop.add_signal_handler(sig, lambda: None)  # (Ctrl-C) reaches it first
    task = loop.create_task(handle())
    nudger = Nudger(sidecar)
    await done.wait()
    nudger.cancel()
    task.cancel()
    if not sidecar.stopped.is_set():
        await sidecar.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse  # in worker processes only: not in the leader (issue 11, idle RSS)

    p = argparse.ArgumentParser(
        prog="python -m diktyo.proxy.workers",
        description="One worker process of a diktyo sidecar started with concurrency N (the "
        "sidecar starts these itself; see 'diktyo sidecar --help', --concurrency).",
    )
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--workers", type=int, required=True)
    p.add_argument("--ctrl-fd", type=int, required=True)
    p.add_argument("--stats-fd", type=int, required=True)
    p.add_argument("--shm-fd", type=int, required=True)
    p.add_argument("--leader", type=int, default=0)
    p.add_argument("--settings", default="{}")
    args = p.parse_args(argv)
    _die_with_parent()
    if args.leader and os.getppid() != args.leader:
        return 1  # the leader died before we could ask to die with it
    settings = json.loads(args.settings or "{}")
    from diktyo.proxy.access_log import NonBlockingLogHandler

    handler: logging.Handler
    try:
        handler = NonBlockingLogHandler("/dev/stderr")
    except OSError:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s %(levelname)s %(name)s [worker {args.index}]: %(message)s"))
    logging.basicConfig(level=str(settings.get("log_level", "warning")).upper(),
                        handlers=[handler])  # fmt: skip
    from diktyo.proxy.sidecar import install_uvloop

    install_uvloop()
    return asyncio.run(_worker(args))

if __name__ == "__main__":
    sys.exit(main())
