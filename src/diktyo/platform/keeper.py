"""The keeper of a detached mesh: restarts its supervisor (and so its control plane) if it dies.

``diktyo up --detach`` runs ``python -m diktyo.platform.keeper up -f FILE ...``; the keeper runs
the supervisor (``diktyo up -f FILE``, foreground) as its child, with the mesh log as output.

- The supervisor exits by itself (``diktyo down``, an error): the keeper exits with its code.
- The supervisor is killed by a signal it could not handle (SIGKILL, the OOM killer, a crash):
  its sidecars and apps keep serving; the keeper starts a new supervisor, which adopts them
  (``LocalMesh.adopt``: control plane back on the same port, sidecars resync). Restarts back
  off like the apps' (immediately, then 1 s doubling to 30 s; reset after 60 s of running).
- SIGTERM/SIGINT to the keeper are passed on to the supervisor (which stops the mesh in order);
  the keeper then exits without restarting it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from diktyo.platform.backoff import BackOff

KEEPER_ENV = "DIKTYO_KEEPER_PID"


def main(argv: list[str]) -> int:
    stopping = False
    child: subprocess.Popen[bytes] | None = None

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    backoff = BackOff(base=1.0, cap=30.0, reset_after=60.0)
    env = {**os.environ, KEEPER_ENV: str(os.getpid()), "PYTHONUNBUFFERED": "1"}
    while True:
        started = time.monotonic()
        child = subprocess.Popen(
            [sys.executable, "-m", "diktyo.cli.main", *argv],
            stdin=subprocess.DEVNULL,
            env=env,
        )
        while True:
            try:
                code = child.wait()
                break
            except InterruptedError:  # pragma: no cover - PEP 475 retries; kept for clarity
                continue
        if stopping or code >= 0:
            return code if code >= 0 else 128 - code
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else code
        delay = backoff.next_delay(time.monotonic() - started)
        print(
            f"keeper: the supervisor (pid {child.pid}) was killed by {name}; its sidecars and apps "
            f"keep serving; starting a new supervisor to adopt them"
            + (f" in {delay:g}s" if delay else ""),
            flush=True,
        )
        deadline = time.monotonic() + delay
        while not stopping and time.monotonic() < deadline:
            time.sleep(0.1)
        if stopping:
            return 0  # type: ignore[unreachable]  # `stopping` is set by the signal handler


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
