"""One supervised child process: started in its own session, output prefixed, stopped in order.

Children get their own session (so Ctrl-C reaches only the supervisor, which stops them in
order) and ``PR_SET_PDEATHSIG`` = SIGTERM on Linux (so they end even if the supervisor is
killed with SIGKILL).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import sys
from collections.abc import Callable
from typing import TextIO

_PR_SET_PDEATHSIG = 1


def _child_setup() -> None:  # runs in the child between fork and exec
    os.setsid()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Child:
    """A child process whose stdout/stderr lines are printed as ``[label] line``."""

    def __init__(
        self,
        label: str,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        out: TextIO | None = None,
        on_line: Callable[[str], bool] | None = None,
    ) -> None:
        self.label = label
        self.argv = argv
        self.env = env
        self.cwd = cwd
        self.out = out or sys.stdout
        self.on_line = on_line  # return True to swallow the line
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self) -> None:
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                preexec_fn=_child_setup,
                limit=1 << 20,
            )
        except OSError as exc:
            raise RuntimeError(
                f"[{self.label}] cannot start {self.argv[0]!r}: {exc.strerror or exc}"
            ) from None
        self._reader = asyncio.get_running_loop().create_task(
            self._pump(), name=f"log-{self.label}"
        )

    async def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while True:
            try:
                raw = await self.proc.stdout.readline()
            except (ValueError, asyncio.LimitOverrunError):
                continue
            if not raw:
                return
            line = raw.decode(errors="replace").rstrip("\n")
            if self.on_line is not None and self.on_line(line):
                continue
            self.out.write(f"[{self.label}] {line}\n")
            self.out.flush()

    async def wait(self) -> int:
        assert self.proc is not None
        code = await self.proc.wait()
        if self._reader is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._reader), 1.0)
        return code

    async def stop(self, grace: float = 5.0) -> int | None:
        """SIGTERM, wait ``grace`` seconds, then SIGKILL the whole process group."""
        if self.proc is None:
            return None
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), grace)
            except TimeoutError:
                self.out.write(f"[{self.label}] did not stop in {grace:g}s; killing it\n")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                await self.proc.wait()
        # whatever the child left in its process group goes too
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self._reader is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._reader, 1.0)
        return self.proc.returncode
