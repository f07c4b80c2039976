"""The systems under test, each started fresh per repetition on the same upstream:
direct, diktyo sidecar, nginx, HAProxy, and the two-hop mesh paths (diktyo and HAProxy)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import configs
from procs import PROXY_CORE, Proc, free_port, start, start_sidecar

ALL_TARGETS = (
    "direct", "diktyo", "diktyo-c2", "diktyo-pure", "nginx", "haproxy", "mesh-diktyo",
    "mesh-haproxy", "bare",
)
DIKTYO_TARGETS = ("diktyo", "diktyo-c2", "diktyo-pure", "mesh-diktyo")
# diktyo-c2: the same sidecar with concurrency 2 (two worker processes), allowed on both cores
# diktyo-pure: the same sidecar with DIKTYO_PURE=1, i.e. the .py sources even where the hot path
# is compiled (pure vs compiled of one commit in one run)
# bare: bench/bare.py, a uvloop + httptools forwarding loop with no routing or stats (the floor
# of diktyo's stack)


@dataclass
class Running:
    """A started target: the port wrk talks to and the proxy processes to measure."""

    name: str
    port: int
    procs: list[Proc] = field(default_factory=list)

    def stop(self) -> None:
        for p in self.procs:
            p.stop()


def diktyo_argv() -> list[str]:
    exe = Path(sys.executable).parent / "diktyo"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("diktyo")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from diktyo.cli.main import main; sys.exit(main())"]


def diktyo_sidecar_available() -> tuple[bool, str]:
    """Whether ``diktyo sidecar`` exists in this checkout (it is being written)."""
    try:
        out = subprocess.run(
            [*diktyo_argv(), "sidecar", "--help"],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"cannot run diktyo: {exc}"
    if out.returncode != 0 or "--snapshot" not in out.stdout:
        return False, "'diktyo sidecar --snapshot FILE' is not available in this checkout"
    return True, ""


def _validate(snap: dict[str, object]) -> None:
    from diktyo.snapshot import codec

    codec.from_builtins(snap)  # raises SnapshotError with a readable message


def _sidecar(
    tmp: Path,
    name: str,
    snap: dict[str, object],
    listener: str = "",
    concurrency: int = 1,
    pure: bool = False,
) -> Proc:
    _validate(snap)
    path = tmp / f"{name}.snapshot.json"
    path.write_text(json.dumps(snap, indent=1))
    argv = [*diktyo_argv(), "sidecar", "--snapshot", str(path), "--admin-port", str(free_port())]
    if pure:  # env execs: the measured pid is diktyo's
        argv = ["env", "DIKTYO_PURE=1", *argv]
    if concurrency > 1:  # one core per worker (taskset re-pins the pinned launcher's child)
        last = min(concurrency, os.cpu_count() or 1) - 1
        argv = ["taskset", "-c", f"0-{last}", *argv, "--concurrency", str(concurrency)]
    return start_sidecar(name, argv, tmp / f"{name}.log", PROXY_CORE, listener=listener)


CLIENT_LISTENER = f"outbound|{configs.SERVICE}:80"
SERVER_LISTENER = "inbound|80"


def translated_snapshot(
    tmp: Path, name: str, yaml_text: str, role: str, app_port: int = 0
) -> dict[str, Any]:
    """Istio YAML -> snapshot with diktyo's own loader and translator (as ``diktyo sidecar
    --config`` does), for a client node with a per-upstream local listener (``default_host``)
    or a server node with an inbound listener in front of ``app_port``."""
    from diktyo.api import load_paths
    from diktyo.control.model import InboundPort, ProxyNode, PushContext
    from diktyo.control.translate import registry_from_service_entries, translate
    from diktyo.snapshot import codec
    from diktyo.snapshot.model import Node

    d = tmp / f"{name}-istio"
    d.mkdir(exist_ok=True)
    (d / "mesh.yaml").write_text(yaml_text)
    result = load_paths([d])
    errors = [e for e in result.errors if getattr(e, "severity", "error") == "error"]
    if errors:
        raise ValueError("bench Istio YAML does not load:\n" + "\n".join(map(str, errors)))
    push = PushContext(
        resources=tuple(result.resources),
        registry=registry_from_service_entries(result.resources),
        version="bench-1",
    )
    if role == "client":
        node = Node(
            id="bench-client-1.bench",
            workload="bench-client",
            namespace="bench",
            labels={"app": "bench-client", "version": "v1"},
        )
        proxy = ProxyNode(node=node, local_ports={f"{configs.SERVICE}:80": 0})
    else:
        node = Node(
            id="upstream-v1-1.bench",
            workload="upstream-v1",
            namespace="bench",
            labels={"app": "upstream", "version": "v1"},
            services=(configs.SERVICE,),
        )
        proxy = ProxyNode(node=node, inbound=(InboundPort(80, 0, app_port),))
    out = codec.to_builtins(translate(proxy, push))
    assert isinstance(out, dict)
    return out


def _nginx(tmp: Path, name: str, conf_text: str, port: int, core: int) -> Proc:
    conf = tmp / f"{name}.conf"
    conf.write_text(conf_text)
    argv = ["nginx", "-p", str(tmp), "-e", str(tmp / f"{name}-error.log"), "-c", str(conf)]
    return start(name, argv, port, tmp / f"{name}.log", core)


def _haproxy(tmp: Path, name: str, port: int, upstream_port: int) -> Proc:
    conf = tmp / f"{name}.cfg"
    conf.write_text(configs.haproxy_conf(port, upstream_port))
    return start(name, ["haproxy", "-db", "-f", str(conf)], port, tmp / f"{name}.log", PROXY_CORE)


def start_upstream(tmp: Path, core: int) -> Proc:
    port, port2 = free_port(), free_port()
    p = _nginx(tmp, "upstream", configs.upstream_nginx_conf(tmp, port, port2), port, core)
    p.extra["v2_port"] = port2
    return p


def start_target(name: str, tmp: Path, upstream: Proc, config: str = "yaml") -> Running:
    """Start target ``name`` in front of ``upstream``. ``config`` (diktyo targets): ``yaml``
    translates the bench's Istio YAML with diktyo's translator, ``snapshot`` uses the
    hand-written snapshot of ``configs.py``."""
    upstream_port = upstream.port
    v2_port = int(upstream.extra.get("v2_port") or upstream_port)
    if name == "direct":
        return Running(name, upstream_port)
    if name == "nginx":
        port = free_port()
        p = _nginx(
            tmp, "nginx", configs.nginx_proxy_conf(tmp, port, upstream_port), port, PROXY_CORE
        )
        return Running(name, port, [p])
    if name == "haproxy":
        port = free_port()
        return Running(name, port, [_haproxy(tmp, "haproxy", port, upstream_port)])
    if name == "bare":
        port = free_port()
        argv = [sys.executable, str(Path(__file__).resolve().parent / "bare.py"),
                "--port", str(port), "--upstream-port", str(upstream_port)]
        return Running(name, port, [start(name, argv, port, tmp / "bare.log", PROXY_CORE)])
    if name == "mesh-haproxy":
        ps = free_port()
        server = _haproxy(tmp, "haproxy-server", ps, upstream_port)
        pc = free_port()
        try:
            client = _haproxy(tmp, "haproxy-client", pc, ps)
        except Exception:
            server.stop()
            raise
        return Running(name, pc, [client, server])
    if name in ("diktyo", "diktyo-c2", "diktyo-pure"):
        workers = 2 if name == "diktyo-c2" else 1
        pure = name == "diktyo-pure"
        if config == "yaml":
            yaml_text = configs.istio_yaml(("127.0.0.1", upstream_port), ("127.0.0.1", v2_port))
            snap = translated_snapshot(tmp, name, yaml_text, "client")
            p = _sidecar(tmp, name, snap, CLIENT_LISTENER, workers, pure)
        else:
            snap = configs.client_sidecar_snapshot(
                0, [("127.0.0.1", upstream_port)], via_sidecar=False
            )
            p = _sidecar(tmp, name, snap, concurrency=workers, pure=pure)
        return Running(name, p.port, [p])
    if name == "mesh-diktyo":
        if config == "yaml":
            yaml_text = configs.istio_yaml(("127.0.0.1", upstream_port), ("127.0.0.1", v2_port))
            snap = translated_snapshot(tmp, "diktyo-server", yaml_text, "server", upstream_port)
            server = _sidecar(tmp, "diktyo-server", snap, SERVER_LISTENER)
        else:
            snap = configs.server_sidecar_snapshot(0, upstream_port)
            server = _sidecar(tmp, "diktyo-server", snap)
        try:
            if config == "yaml":
                ep = ("127.0.0.1", server.port)
                yaml_text = configs.istio_yaml(ep, ep)
                snap = translated_snapshot(tmp, "diktyo-client", yaml_text, "client")
                client = _sidecar(tmp, "diktyo-client", snap, CLIENT_LISTENER)
            else:
                snap = configs.client_sidecar_snapshot(
                    0, [("127.0.0.1", server.port)], via_sidecar=True
                )
                client = _sidecar(tmp, "diktyo-client", snap)
        except Exception:
            server.stop()
            raise
        return Running(name, client.port, [client, server])
    raise ValueError(f"unknown target {name!r}; choose from {', '.join(ALL_TARGETS)}")
