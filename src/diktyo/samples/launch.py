"""Starting a sample app as a child process and waiting until it listens (for tests, benches, demos).

Example::

    with start_sample("diktyo.samples.httpbin", log_path=tmp / "httpbin.log") as httpbin:
        urllib.request.urlopen(httpbin.url + "/get")

The app gets ``PORT=0`` unless ``env`` says otherwise, and reports the port it got on its first
line (``<pod> listening on http://127.0.0.1:PORT``), which is where ``url`` comes from.
Proxy variables of the caller are not passed on unless given in ``env``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Self

_LISTENING = re.compile(r"listening on (http://[^\s]+)")
_PROXY_VARS = ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


class SampleError(RuntimeError):
    """A sample app did not start; the message includes the end of its log."""


class SampleProcess:
    """A running sample app; ``url`` is ``http://127.0.0.1:PORT``."""

    def __init__(self, module: str, process: subprocess.Popen[bytes], log_path: Path) -> None:
        self.module = module
        self.process = process
        self.log_path = log_path
        self.url = ""

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_ready(self, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = _LISTENING.search(self.log())
            if match:
                self.url = match.group(1)
                return self.url
            if self.process.poll() is not None:
                raise SampleError(
                    f"{self.module} exited with code {self.process.returncode} before listening; "
                    f"its log ({self.log_path}):\n{self.log()[-2000:]}"
                )
            time.sleep(0.05)
        self.stop()
        raise SampleError(
            f"{self.module} did not print 'listening on' within {timeout:.0f} s; "
            f"its log ({self.log_path}):\n{self.log()[-2000:]}"
        )

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, wait, SIGKILL if needed; the exit code (0 when it stopped cleanly)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_sample(
    module: str,
    *,
    log_path: Path,
    env: Mapping[str, str] | None = None,
    timeout: float = 30.0,
) -> SampleProcess:
    """Start ``python -m <module>`` and return once it listens."""
    child_env = {k: v for k, v in os.environ.items() if k not in _PROXY_VARS}
    child_env["PORT"] = "0"
    child_env["PYTHONUNBUFFERED"] = "1"
    child_env.update(env or {})
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", module],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=child_env,
        )
    sample = SampleProcess(module, process, log_path)
    try:
        sample.wait_ready(timeout)
    except BaseException:
        sample.stop()
        raise
    return sample
