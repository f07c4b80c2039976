"""A real etcd cluster on loopback for tests and benchmarks (Debian's ``etcd-server``).

cluster = EtcdCluster(tmp_path, members=3); cluster.start()   # waits until it has a leader
cp = ControlPlane(backend=EtcdBackend(cluster.client_urls, key_file=...))
cluster.stop_member(1) / cluster.start_member(1)               # faults
cluster.close()                                                # kills every member

Every member listens on 127.0.0.1 only, on free ports, with its data in ``tmp_path``.
``ETCD_BIN`` is ``/usr/bin/etcd`` unless ``$DIKTYO_ETCD`` names another binary.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from diktyo.platform.ports import free_port

ETCD_BIN = os.environ.get("DIKTYO_ETCD") or shutil.which("etcd") or "/usr/bin/etcd"


def etcd_available() -> bool:
    return os.access(ETCD_BIN, os.X_OK)


class EtcdCluster:
    """``members`` etcd processes forming one cluster on 127.0.0.1."""

    def __init__(self, directory: str | Path, members: int = 3, name: str = "t") -> None:
        self.directory = Path(directory)
        self.names = [f"{name}{i}" for i in range(members)]
        self.client_ports = [free_port() for _ in range(members)]
        self.peer_ports = [free_port() for _ in range(members)]
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * members
        self.token = f"diktyo-test-{os.getpid()}-{time.monotonic_ns()}"

    @property
    def client_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.client_ports]

    @property
    def store_url(self) -> str:
        """``etcd://127.0.0.1:P1,127.0.0.1:P2,...`` for ``--store``."""
        return "etcd://" + ",".join(f"127.0.0.1:{p}" for p in self.client_ports)

    def _initial_cluster(self) -> str:
        return ",".join(
            f"{n}=http://127.0.0.1:{p}" for n, p in zip(self.names, self.peer_ports, strict=True)
        )

    def start(self, timeout: float = 20.0) -> None:
        for i in range(len(self.names)):
            self.start_member(i, wait=False)
        self.wait_healthy(timeout)

    def start_member(self, i: int, wait: bool = True, timeout: float = 20.0) -> None:
        if self.procs[i] is not None and self.procs[i].poll() is None:  # type: ignore[union-attr]  # checked for None on the left
            return
        data = self.directory / f"{self.names[i]}.etcd"
        log = open(self.directory / f"{self.names[i]}.log", "ab")  # noqa: SIM115 - child owns it
        cmd = [
            ETCD_BIN,
            "--name", self.names[i],
            "--data-dir", str(data),
            "--listen-client-urls", self.client_urls[i],
            "--advertise-client-urls", self.client_urls[i],
            "--listen-peer-urls", f"http://127.0.0.1:{self.peer_ports[i]}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer_ports[i]}",
            "--initial-cluster", self._initial_cluster(),
            "--initial-cluster-token", self.token,
            "--initial-cluster-state", "new",
            "--heartbeat-interval", "100",
            "--election-timeout", "1000",
            "--quota-backend-bytes", str(256 * 1024 * 1024),
            "--log-level", "warn",
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        self.procs[i] = subprocess.Popen(cmd, stdout=log, stderr=log, env=env)
        log.close()
        if wait:
            self.wait_healthy(timeout, members=[i])

    def stop_member(self, i: int) -> None:
        """SIGKILL member ``i`` (its data stays; ``start_member(i)`` rejoins it)."""
        proc = self.procs[i]
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        self.procs[i] = None

    def healthy(self, i: int) -> bool:
        try:
            with urllib.request.urlopen(self.client_urls[i] + "/health", timeout=1) as resp:
                return bool(json.loads(resp.read()).get("health") == "true")
        except (OSError, urllib.error.URLError, ValueError):
            return False

    def wait_healthy(self, timeout: float = 20.0, members: list[int] | None = None) -> None:
        todo = members if members is not None else list(range(len(self.names)))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self.healthy(i) for i in todo):
                return
            time.sleep(0.1)
        logs = "; ".join(
            (self.directory / f"{self.names[i]}.log").read_text(errors="replace")[-500:]
            for i in todo
        )
        raise RuntimeError(f"etcd members {todo} not healthy after {timeout} s: {logs}")

    def close(self) -> None:
        for i in range(len(self.names)):
            self.stop_member(i)
