"""One supervised child process: own session, output through a log file, stopped in order.

Children get their own session (so Ctrl-C reaches only the supervisor, which stops them in
order). Their stdout/stderr go to a log file (``LOG_DIR/<label>.log``, appended), never to a
pipe: a child never blocks on a busy supervisor, and it keeps running (and writing) when the
supervisor dies, where a pipe would give it EPIPE or SIGPIPE. The supervisor tails the file and
prints each line as ``[label] line``.

``die_with_parent=True`` adds ``PR_SET_PDEATHSIG`` = SIGTERM on Linux (the child ends when the
supervisor does, even by SIGKILL): for meshes that live inside a test or ``diktyo demo``.
``diktyo up`` starts children without it, so sidecars and apps keep serving when the supervisor
is killed, and a new supervisor can adopt them (``Child.adopt``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

_PR_SET_PDEATHSIG = 1
_MAX_LOG = 4 << 20  # a log file the supervisor has read is truncated past this size


def _child_setup(die_with_parent: bool) -> None:  # runs in the child between fork and exec
    os.setsid()
    if die_with_parent and sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _setup_with_pdeathsig() -> None:
    _child_setup(True)


def _setup_without_pdeathsig() -> None:
    _child_setup(False)


def proc_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (``/proc/PID/stat`` field 22).

    With the pid it identifies a process across supervisors: a pid reused by another process
    has another start time.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return None
    try:
        # the command name (field 2) may hold spaces and parentheses: split after the last ')'
        return int(stat[stat.rindex(")") + 2 :].split()[19])
    except (ValueError, IndexError):
        return None


def same_process(pid: int, start_time: int | None) -> bool:
    """``pid`` still runs as the process that started at ``start_time`` (not a reused pid,
    not a zombie waiting to be reaped)."""
    return start_time is not None and proc_start_time(pid) == start_time and _alive(pid)


def log_file_name(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-") + ".log"


class Child:
    """A child process whose output lines are printed as ``[label] line``."""

    def __init__(
        self,
        label: str,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        out: TextIO | None = None,
        on_line: Callable[[str], bool] | None = None,
        log_dir: str | Path | None = None,
        die_with_parent: bool = True,
        user: int | None = None,
        group: int | None = None,
    ) -> None:
        self.label = label
        self.argv = argv
        self.env = env
        self.cwd = cwd
        self.out = out or sys.stdout
        self.on_line = on_line  # return True to swallow the line
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.die_with_parent = die_with_parent
        self.user = user  # run as this uid/gid (needs root); supplementary groups dropped
        self.group = group
        self.proc: asyncio.subprocess.Process | None = None
        self.adopted_pid: int | None = None  # a process started by an earlier supervisor
        self.start_time: int | None = None
        self._exited: asyncio.Future[None] | None = None  # adopted: set when it ends
        self._reader: asyncio.Task[None] | None = None

    @property
    def log_path(self) -> Path | None:
        return self.log_dir / log_file_name(self.label) if self.log_dir is not None else None

    @property
    def pid(self) -> int | None:
        if self.proc is not None:
            return self.proc.pid
        return self.adopted_pid

    @property
    def running(self) -> bool:
        if self.proc is not None:
            return self.proc.returncode is None
        return self._exited is not None and not self._exited.done()

    @property
    def returncode(self) -> int | None:
        """The exit status (``-N`` for signal N); None while running, and for an adopted
        process, whose status only its parent (gone) or init could read."""
        return self.proc.returncode if self.proc is not None else None

    async def start(self) -> None:
        path = self.log_path
        if path is None:
            raise RuntimeError(f"[{self.label}] no log folder for its output")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        offset = os.fstat(fd).st_size
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=fd,
                stderr=asyncio.subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                **self._credentials(),
                preexec_fn=(
                    _setup_with_pdeathsig if self.die_with_parent else _setup_without_pdeathsig
                ),
            )
        except OSError as exc:
            raise RuntimeError(
                f"[{self.label}] cannot start {self.argv[0]!r}: {exc.strerror or exc}"
            ) from None
        finally:
            os.close(fd)
        self.start_time = proc_start_time(self.proc.pid)
        self._reader = asyncio.get_running_loop().create_task(
            self._tail(path, offset), name=f"log-{self.label}"
        )

    def _credentials(self) -> dict[str, Any]:
        if self.user is None and self.group is None:
            return {}
        creds: dict[str, Any] = {"extra_groups": []}
        if self.user is not None:
            creds["user"] = self.user
            creds["group"] = self.group if self.group is not None else self.user
        else:
            creds["group"] = self.group
        return creds

    def adopt(self, pid: int, start_time: int | None) -> bool:
        """Take over a process an earlier supervisor started (same pid and start time).

        False when it is gone (or the pid now belongs to another process). Its exit is seen
        through a pidfd; its exit status cannot be (it is not our child).
        """
        if not same_process(pid, start_time):
            return False
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return False
        loop = asyncio.get_running_loop()
        exited: asyncio.Future[None] = loop.create_future()

        def on_exit() -> None:
            loop.remove_reader(pidfd)
            os.close(pidfd)
            if not exited.done():
                exited.set_result(None)

        loop.add_reader(pidfd, on_exit)
        self.adopted_pid = pid
        self.start_time = start_time
        self._exited = exited
        path = self.log_path
        if path is not None:
            offset = path.stat().st_size if path.exists() else 0
            self._reader = loop.create_task(self._tail(path, offset), name=f"log-{self.label}")
        return True

    async def _tail(self, path: Path, offset: int) -> None:
        """Print the lines the child appends to its log file, until it exits and all is read."""
        pending = b""
        # a local file: reads return at once (no waiting on a peer), so plain I/O is fine here
        with open(path, "rb") as f:  # noqa: ASYNC230
            f.seek(offset)
            while True:
                chunk = f.read(65536)
                if chunk:
                    pending += chunk
                    *lines, pending = pending.split(b"\n")
                    for raw in lines:
                        self._line(raw)
                    if len(pending) > 1 << 20:  # an endless line: show it in pieces
                        self._line(pending)
                        pending = b""
                    continue
                if not self.running:
                    if pending:
                        self._line(pending)
                    return
                pos = f.tell()
                if pos > _MAX_LOG:
                    # everything was read and shown: keep the file small (the child appends
                    # with O_APPEND, so its next line lands at the new end)
                    with contextlib.suppress(OSError):
                        os.truncate(path, 0)
                        f.seek(0)
                elif os.stat(path).st_size < pos:  # truncated by someone else
                    f.seek(0)
                await asyncio.sleep(0.05)

    def _line(self, raw: bytes) -> None:
        line = raw.decode(errors="replace").rstrip("\r")
        if self.on_line is not None and self.on_line(line):
            return
        self.out.write(f"[{self.label}] {line}\n")
        self.out.flush()

    async def _reader_done(self, timeout: float = 1.0) -> None:
        if self._reader is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._reader), timeout)

    async def wait(self) -> int | None:
        """Wait for the exit; the status, or None for an adopted process (unknown)."""
        if self.proc is not None:
            code: int | None = await self.proc.wait()
        else:
            assert self._exited is not None
            await self._exited
            code = None
        await self._reader_done()
        return code

    async def stop(self, grace: float = 5.0) -> int | None:
        """SIGTERM, wait ``grace`` seconds, then SIGKILL the whole process group."""
        pid = self.pid
        if pid is None:
            return None
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(self._wait_exit(), grace)
            except TimeoutError:
                self.out.write(f"[{self.label}] did not stop in {grace:g}s; killing it\n")
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
                await self._wait_exit()
        # whatever the child left in its process group goes too
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        await self._reader_done()
        return self.returncode

    async def _wait_exit(self) -> None:
        if self.proc is not None:
            await self.proc.wait()
        elif self._exited is not None:
            await self._exited


def stop_pids(groups: list[list[int]], grace: float = 5.0) -> list[int]:
    """Stop process groups of processes that are not our children (a dead supervisor's).

    ``groups`` in order (apps, then sidecars): SIGTERM each group's process groups, wait up to
    ``grace`` seconds for them to go, then the next group; SIGKILL what is left. Returns the
    pids that had to be killed.
    """
    killed: list[int] = []
    for pids in groups:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.05)
        for pid in pids:
            if _alive(pid):
                killed.append(pid)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
    return killed


def is_running(pid: int) -> bool:
    """The process exists and is not a zombie."""
    return _alive(pid)


def _alive(pid: int) -> bool:
    """Running (a zombie, already dead but not yet reaped by init, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2 :][:1] not in (b"Z", b"X")
