"""Processes of a benchmark run: start pinned to a core, wait until ready, read their CPU and
memory from procfs (summed over the process tree), stop them."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
PROXY_CORE = 0
LOAD_CORE = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pinned(core: int, argv: list[str]) -> list[str]:
    if os.cpu_count() and os.cpu_count() > core and shutil.which("taskset"):  # type: ignore[operator]
        return ["taskset", "-c", str(core), *argv]
    return argv


def http_get(port: int, path: str = "/", timeout: float = 2.0) -> int:
    """One raw HTTP/1.1 GET; returns the status code (0 on failure)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while b"\r\n" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            parts = data.split(b" ", 2)
            return int(parts[1]) if len(parts) > 1 else 0
    except (OSError, ValueError):
        return 0


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def tree(pid: int) -> list[int]:
    kids = _children()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, ()))
    return out


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
        except (OSError, IndexError):
            pass
    return total / CLK_TCK


def sys_seconds(pids: list[int]) -> float:
    """Kernel-mode CPU (stime) of ``pids``: the share of a proxy's CPU spent in syscalls."""
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            total += int(fields[12])
        except (OSError, IndexError):
            pass
    return total / CLK_TCK


def sched_ns(pids: list[int]) -> int:
    """CPU time in ns of every thread of ``pids`` (/proc/PID/task/TID/schedstat): finer than
    the 10 ms ticks of utime+stime, used as a cross-check."""
    total = 0
    for p in pids:
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tids:
            try:
                with open(f"/proc/{p}/task/{t}/schedstat") as f:
                    total += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                pass
    return total


def status_kib(pids: list[int], key: str) -> int:
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def core_busy() -> dict[int, tuple[int, int]]:
    """Per-core (busy, total) jiffies from /proc/stat."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                name, *vals = line.split()
                v = [int(x) for x in vals]
                idle = v[3] + v[4]
                out[int(name[3:])] = (sum(v[:8]) - idle, sum(v[:8]))
    return out


@dataclass
class Proc:
    """One started process (nginx, haproxy, a sidecar) with its ports and log file."""

    name: str
    popen: subprocess.Popen[bytes]
    port: int
    log: Path
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def pids(self) -> list[int]:
        # taskset execs the program, so popen.pid is the program itself
        return tree(self.pid)

    def cpu(self) -> float:
        return cpu_seconds(self.pids())

    def rss_kib(self) -> int:
        return status_kib(self.pids(), "VmRSS")

    def hwm_kib(self) -> int:
        return status_kib(self.pids(), "VmHWM")

    def stop(self) -> None:
        if self.popen.poll() is None:
            try:
                os.kill(self.popen.pid, signal.SIGTERM)
                self.popen.wait(timeout=5)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                self.popen.kill()
                self.popen.wait(timeout=5)

    def tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


class StartError(RuntimeError):
    """A process did not become ready; the message says which and shows its log."""


def start(
    name: str,
    argv: list[str],
    port: int,
    log: Path,
    core: int,
    timeout: float = 10.0,
    ready_path: str = "/",
) -> Proc:
    """Start ``argv`` pinned to ``core`` and wait until ``GET ready_path`` answers on ``port``."""
    with open(log, "wb") as f:
        popen = subprocess.Popen(
            pinned(core, argv), stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    proc = Proc(name, popen, port, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            raise StartError(f"{name} exited with {popen.returncode} at start:\n{proc.tail()}")
        if http_get(port, ready_path, timeout=0.5) == 200:
            return proc
        time.sleep(0.05)
    proc.stop()
    raise StartError(
        f"{name} did not answer 200 on 127.0.0.1:{port}{ready_path} within {timeout}s:\n{proc.tail()}"
    )


def start_sidecar(
    name: str, argv: list[str], log: Path, core: int, timeout: float = 20.0, listener: str = ""
) -> Proc:
    """Start a diktyo sidecar and wait for its JSON ready line on stdout:
    ``{"event":"ready","admin":P,"listeners":{"name":port}}``. Stderr goes to ``log``.
    ``proc.port`` is the port of the listener named ``listener`` (else the first one)."""
    with open(log, "wb") as errf:
        popen = subprocess.Popen(
            pinned(core, argv), stdout=subprocess.PIPE, stderr=errf, stdin=subprocess.DEVNULL
        )
    assert popen.stdout is not None
    proc = Proc(name, popen, 0, log)
    deadline = time.monotonic() + timeout
    buf = b""
    fd = popen.stdout.fileno()
    while time.monotonic() < deadline:
        r, _, _ = select.select([fd], [], [], 0.1)
        if r:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                if isinstance(msg, dict) and msg.get("event") == "ready":
                    proc.extra = msg
                    listeners = msg.get("listeners") or {}
                    if listener and listener not in listeners:
                        proc.stop()
                        raise StartError(
                            f"{name}: no listener {listener!r} in its ready line: {msg}"
                        )
                    proc.port = int(listeners.get(listener) or next(iter(listeners.values()), 0))
                    # keep draining stdout so the sidecar never blocks on a full pipe
                    _drain(popen)
                    return proc
        elif popen.poll() is not None:
            break
    proc.stop()
    raise StartError(
        f"{name} did not print its ready line within {timeout}s (exit code {popen.poll()}); "
        f"command: {' '.join(argv)}\nstdout: {buf[-2000:].decode(errors='replace')}\nstderr:\n{proc.tail()}"
    )


def _drain(popen: subprocess.Popen[bytes]) -> None:
    import threading

    def run() -> None:
        assert popen.stdout is not None
        try:
            while popen.stdout.read(65536):
                pass
        except (OSError, ValueError):
            pass

    threading.Thread(target=run, daemon=True).start()


def istio_request_counts(admin_port: int) -> dict[str, int]:
    """A sidecar's ``istio_requests_total`` summed by ``response_code response_flags`` (from its
    admin ``/stats/prometheus``): shows what failed when a run has errors."""
    import re
    import urllib.request

    try:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{admin_port}/stats/prometheus", timeout=5
        ) as resp:
            text = resp.read().decode()
    except OSError as exc:
        return {"scrape_error": 1, str(exc)[:100]: 1}
    out: dict[str, int] = {}
    for line in text.splitlines():
        if not line.startswith("istio_requests_total{"):
            continue
        code = re.search(r'response_code="([^"]*)"', line)
        flags = re.search(r'response_flags="([^"]*)"', line)
        reporter = re.search(r'reporter="([^"]*)"', line)
        key = " ".join(m.group(1) if m else "?" for m in (reporter, code, flags))
        out[key] = out.get(key, 0) + int(float(line.rsplit(" ", 1)[1]))
    return out
