#!/usr/bin/env python3
"""HTTP/2 benchmark: diktyo, HAProxy (h2) and nginx (http2) in front of one h2c upstream.

h2c part (``h2load``, Debian ``nghttp2-client``): one fixed-response nginx upstream speaking
h2c (prior knowledge) on core 1; per repetition every target is started fresh on core 0 and
measured with ``h2load -c C -m M`` (saturation) from core 1:

- ``direct``: h2load -> upstream;
- ``diktyo``: h2load -> diktyo sidecar (outbound listener, h2c) -> upstream over HTTP/2
  (the cluster's ``upstream_protocol: HTTP/2``);
- ``haproxy``: ``bind ... proto h2`` -> ``server ... proto h2`` (HTTP/2 both sides);
- ``nginx``: ``listen ... http2`` -> ``grpc_pass`` (nginx speaks HTTP/2 upstream only through
  its gRPC module; ``proxy_pass`` would be HTTP/1.1).

Per target: rps, CPU per request of the proxy processes (utime+stime / requests) and p50/p99
of the per-request times h2load logs (``--log-file``).

gRPC part (``--grpc``): the sample's grpcio server (``diktyo.samples.grpc_ratings``, core 1)
called with ``h2load --rps`` (one connection, a fixed rate, ``--grpc-rate`` calls/s) directly,
through two diktyo sidecars (client sidecar -> server sidecar -> app, HTTP/2 on every hop) and
through two HAProxy hops (h2 both sides); p50/p99 from h2load's request log. The issue's
target: the two sidecars' p99 within 2x two HAProxy hops at 1,000 calls/s.

    python bench/h2bench.py --smoke          # 1 s per target, the harness's own check
    python bench/h2bench.py                  # 3 repetitions x 10 s
    python bench/h2bench.py --grpc           # add the gRPC unary comparison

Do not run it while others use the machine: it saturates both cores.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import configs
import procs
from procs import LOAD_CORE, PROXY_CORE, Proc, free_port

BODY = "ok\n"
BASE_SRC = ""  # --base-src: the src directory the *-base targets run


# ----------------------------------------------------------------------------- configs


def upstream_conf(tmp: Path, port: int) -> str:
    return (
        configs._nginx_common(tmp, "h2upstream")
        + "http {\n"
        + configs._nginx_http_common(tmp, "h2upstream")
        + f"""  http2_max_concurrent_streams 1024;
  server {{
    listen 127.0.0.1:{port} http2 backlog=4096;
    location / {{ return 200 "{BODY.rstrip()}\\n"; }}
  }}
}}
"""
    )


def nginx_conf(tmp: Path, port: int, upstream_port: int) -> str:
    return (
        configs._nginx_common(tmp, "h2nginx")
        + "http {\n"
        + configs._nginx_http_common(tmp, "h2nginx")
        + f"""  http2_max_concurrent_streams 1024;
  upstream up {{
    server 127.0.0.1:{upstream_port};
    keepalive 64;
  }}
  server {{
    listen 127.0.0.1:{port} http2 backlog=4096;
    location / {{ grpc_pass grpc://up; }}
  }}
}}
"""
    )


def haproxy_conf(port: int, upstream_port: int) -> str:
    return f"""global
  nbthread 1
  maxconn 4096

defaults
  mode http
  timeout connect 5s
  timeout client 120s
  timeout server 120s
  http-reuse always

frontend fe
  bind 127.0.0.1:{port} proto h2
  default_backend be

backend be
  server s1 127.0.0.1:{upstream_port} proto h2 maxconn 4096
"""


def diktyo_snapshot(listen_port: int, upstream_port: int) -> dict[str, Any]:
    snap = configs.client_sidecar_snapshot(
        listen_port, [("127.0.0.1", upstream_port)], via_sidecar=False
    )
    for c in snap["clusters"]:
        c["upstream_protocol"] = "HTTP/2"
        c["pool"]["http2_max_requests"] = 100000
    return snap


# ----------------------------------------------------------------------------- processes


def wait_h2(port: int, timeout: float = 10.0) -> None:
    """Ready = answers an h2c prior-knowledge request with :status 200."""
    import h2.config
    import h2.connection
    import h2.events

    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
                c.initiate_connection()
                c.send_headers(
                    1,
                    [(":method", "GET"), (":scheme", "http"), (":authority", "x"), (":path", "/")],
                    end_stream=True,
                )
                s.sendall(c.data_to_send())
                end = time.monotonic() + 2
                while time.monotonic() < end:
                    data = s.recv(65536)
                    if not data:
                        break
                    for ev in c.receive_data(data):
                        if isinstance(ev, h2.events.ResponseReceived):
                            if dict(ev.headers).get(b":status") == b"200":
                                return
                            last = f"status {dict(ev.headers).get(b':status')!r}"
                    s.sendall(c.data_to_send())
        except OSError as exc:
            last = str(exc)
        time.sleep(0.1)
    raise procs.StartError(f"nothing answered h2c on 127.0.0.1:{port} within {timeout}s ({last})")


def spawn(name: str, argv: list[str], port: int, log: Path, core: int) -> Proc:
    with open(log, "wb") as f:
        popen = subprocess.Popen(
            procs.pinned(core, argv), stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    proc = Proc(name, popen, port, log)
    try:
        wait_h2(port)
    except procs.StartError as exc:
        proc.stop()
        raise procs.StartError(f"{name}: {exc}\n{proc.tail()}") from None
    return proc


@contextlib.contextmanager
def codec_env(target: str) -> Iterator[None]:
    """``diktyo-h2`` / ``diktyo-nghttp2`` (and ``mesh-diktyo-...``): start the sidecar with
    ``DIKTYO_HTTP2_CODEC`` set to that codec; plain ``diktyo`` runs the default (auto).
    ``diktyo-nghttp2abi``: libnghttp2 through cffi's ABI mode (``DIKTYO_NGHTTP2_CFFI=abi``),
    not the compiled extension, for an A/B of the two in one run. ``diktyo-base`` (and
    ``mesh-diktyo-base``): the sources of ``--base-src`` (an older tree, built in place)."""
    suffix = target.rsplit("-", 1)[1] if target.endswith(("-h2", "-nghttp2", "-nghttp2abi")) else ""
    env: dict[str, str] = {}
    if target.endswith("-base"):
        if not BASE_SRC:
            raise SystemExit(f"{target}: give --base-src DIR (an older tree's src, built in place)")
        env["PYTHONPATH"] = BASE_SRC
    if suffix:
        env["DIKTYO_HTTP2_CODEC"] = suffix.removesuffix("abi")
        env["DIKTYO_NGHTTP2_CFFI"] = "abi" if suffix.endswith("abi") else "auto"
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def start_target(name: str, tmp: Path, upstream_port: int) -> tuple[int, list[Proc]]:
    if name == "direct":
        return upstream_port, []
    port = free_port()
    if name == "nginx":
        conf = tmp / "h2nginx.conf"
        conf.write_text(nginx_conf(tmp, port, upstream_port))
        return port, [spawn(name, ["nginx", "-c", str(conf)], port, tmp / "nginx.log", PROXY_CORE)]
    if name == "haproxy":
        conf = tmp / "h2haproxy.cfg"
        conf.write_text(haproxy_conf(port, upstream_port))
        argv = ["haproxy", "-f", str(conf), "-db"]
        return port, [spawn(name, argv, port, tmp / "haproxy.log", PROXY_CORE)]
    if name.startswith("diktyo"):
        import targets as tg

        snap = tmp / "h2diktyo.json"
        snap.write_text(json.dumps(diktyo_snapshot(0, upstream_port)))
        argv = [*tg.diktyo_argv(), "sidecar", "--snapshot", str(snap), "--admin-port", "0"]
        with codec_env(name):
            proc = procs.start_sidecar(name, argv, tmp / "diktyo.log", PROXY_CORE)
        wait_h2(proc.port)
        return proc.port, [proc]
    raise SystemExit(f"unknown target {name!r}")


# ----------------------------------------------------------------------------- h2load


def parse_h2load(text: str, log: Path) -> dict[str, Any]:
    """rps, successes and failures from h2load's summary; p50/p99 from its request log."""
    res: dict[str, Any] = {"ok": 0, "failed": 0, "rps": 0.0}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("finished in"):
            # finished in 1.00s, 12345.67 req/s, 1.2MB/s
            parts = line.split(",")
            res["rps"] = float(parts[1].split()[0])
        elif line.startswith("requests:"):
            # requests: N total, N started, N done, N succeeded, N failed, N errored, N timeout
            fields = {v.split()[1]: int(v.split()[0]) for v in line[9:].split(",")}
            res["ok"] = fields.get("succeeded", 0)
            res["failed"] = fields.get("failed", 0) + fields.get("errored", 0)
    times = []
    try:
        for row in log.read_text().splitlines():
            cols = row.split("\t")
            if len(cols) >= 3 and cols[1] == "200":
                times.append(int(cols[2]) / 1000.0)
    except OSError:
        pass
    times.sort()
    if times:
        res["p50_ms"] = times[len(times) // 2]
        res["p99_ms"] = times[min(len(times) - 1, int(len(times) * 0.99))]
    return res


def h2load(port: int, seconds: float, clients: int, streams: int, log: Path) -> dict[str, Any]:
    argv = [
        "h2load",
        f"-D{seconds:g}",
        f"-c{clients}",
        f"-m{streams}",
        "-t1",
        f"--log-file={log}",
        f"http://127.0.0.1:{port}/",
    ]
    out = subprocess.run(
        procs.pinned(LOAD_CORE, argv),
        capture_output=True,
        text=True,
        check=False,
        timeout=seconds + 60,
    )
    res = parse_h2load(out.stdout, log)
    if out.returncode != 0 and not res["ok"]:
        res["error"] = (out.stderr or out.stdout)[-500:]
    return res


def run_h2c(args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    up_port = free_port()
    conf = tmp / "h2upstream.conf"
    conf.write_text(upstream_conf(tmp, up_port))
    upstream = spawn("upstream", ["nginx", "-c", str(conf)], up_port, tmp / "up.log", LOAD_CORE)
    rows: list[dict[str, Any]] = []
    try:
        for rep in range(args.reps):
            order = (
                args.targets[rep % len(args.targets) :] + args.targets[: rep % len(args.targets)]
            )
            for name in order:
                port, ps = start_target(name, tmp, up_port)
                try:
                    cpu0 = sum(p.cpu() for p in ps)
                    res = h2load(
                        port, args.seconds, args.clients, args.streams, tmp / f"{name}.tsv"
                    )
                    cpu = sum(p.cpu() for p in ps) - cpu0
                finally:
                    for p in ps:
                        p.stop()
                res.update(target=name, rep=rep)
                if ps and res["ok"]:
                    res["cpu_us_per_req"] = cpu / res["ok"] * 1e6
                rows.append(res)
                print(json.dumps(res), flush=True)
    finally:
        upstream.stop()
    return rows


# ----------------------------------------------------------------------------- gRPC unary


def grpc_haproxy_conf(port: int, upstream_port: int) -> str:
    return haproxy_conf(port, upstream_port)


def grpc_body(path: Path) -> Path:
    msg = b'{"product":1}'
    path.write_bytes(b"\x00" + len(msg).to_bytes(4, "big") + msg)
    return path


def start_grpc_server(tmp: Path) -> tuple[int, Proc]:
    port = free_port()
    env_argv = [sys.executable, "-m", "diktyo.samples.grpc_ratings", "serve"]
    log = tmp / "grpc-server.log"
    import os

    with open(log, "wb") as f:
        popen = subprocess.Popen(
            procs.pinned(LOAD_CORE, env_argv),
            stdout=f,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PORT": str(port), "SERVICE_VERSION": "v1"},
        )
    proc = Proc("grpc-server", popen, port, log)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return port, proc
        except OSError:
            time.sleep(0.1)
    proc.stop()
    raise procs.StartError(f"grpc server did not listen on {port}:\n{proc.tail()}")


def start_grpc_path(name: str, tmp: Path, app_port: int) -> tuple[int, list[Proc]]:
    """direct, mesh-diktyo (client sidecar -> server sidecar -> app, HTTP/2 on every hop,
    plaintext between the sidecars like the HAProxy pair), mesh-haproxy (two h2 hops)."""
    if name == "direct":
        return app_port, []
    if name == "mesh-haproxy":
        p2 = free_port()
        (tmp / "hb.cfg").write_text(haproxy_conf(p2, app_port))
        b = spawn_tcp("haproxy-b", ["haproxy", "-f", str(tmp / "hb.cfg"), "-db"], p2, tmp)
        p1 = free_port()
        (tmp / "ha.cfg").write_text(haproxy_conf(p1, p2))
        a = spawn_tcp("haproxy-a", ["haproxy", "-f", str(tmp / "ha.cfg"), "-db"], p1, tmp)
        return p1, [a, b]
    if name.startswith("mesh-diktyo"):
        import targets as tg

        server = configs.server_sidecar_snapshot(0, app_port)
        for c in server["clusters"]:
            c["upstream_protocol"] = "HTTP/2"
        (tmp / "srv.json").write_text(json.dumps(server))
        argv = [*tg.diktyo_argv(), "sidecar", "--snapshot", str(tmp / "srv.json"),
                "--admin-port", "0"]  # fmt: skip
        with codec_env(name):
            b = procs.start_sidecar("diktyo-b", argv, tmp / "diktyo-b.log", PROXY_CORE)
        client = diktyo_snapshot(0, b.port)
        (tmp / "cli.json").write_text(json.dumps(client))
        argv = [*tg.diktyo_argv(), "sidecar", "--snapshot", str(tmp / "cli.json"),
                "--admin-port", "0"]  # fmt: skip
        with codec_env(name):
            a = procs.start_sidecar("diktyo-a", argv, tmp / "diktyo-a.log", PROXY_CORE)
        return a.port, [a, b]
    raise SystemExit(f"unknown gRPC path {name!r}")


def spawn_tcp(name: str, argv: list[str], port: int, tmp: Path) -> Proc:
    log = tmp / f"{name}.log"
    with open(log, "wb") as f:
        popen = subprocess.Popen(
            procs.pinned(PROXY_CORE, argv), stdout=f, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
    proc = Proc(name, popen, port, log)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc
        except OSError:
            time.sleep(0.05)
    proc.stop()
    raise procs.StartError(f"{name} did not listen on {port}:\n{proc.tail()}")


def run_grpc(args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    """gRPC unary at a fixed rate (h2load --rps, one connection): p50/p99 per path."""
    app_port, app = start_grpc_server(tmp)
    body = grpc_body(tmp / "grpc.bin")
    rows: list[dict[str, Any]] = []
    try:
        for rep in range(args.reps):
            for name in args.grpc_paths:
                port, ps = start_grpc_path(name, tmp, app_port)
                try:
                    # 1 s warm-up at the same rate (as the HTTP/1 bench): connections open,
                    # lazy imports done, and what the previous path left queued in the shared
                    # grpcio server (an overloaded path ends with calls in flight) drained
                    warm = [
                        "h2load", "-D1", "-c1", "-m100", "-t1", f"--rps={args.grpc_rate}",
                        f"-d{body}",
                        "-H", "content-type: application/grpc", "-H", "te: trailers",
                        f"http://127.0.0.1:{port}/ratings.Ratings/Get",
                    ]  # fmt: skip
                    subprocess.run(procs.pinned(LOAD_CORE, warm), capture_output=True, timeout=60)
                    cpu0 = sum(p.cpu() for p in ps)
                    log = tmp / f"grpc-{name}.tsv"
                    argv = [
                        "h2load", f"-D{args.seconds:g}", "-c1", "-m100", "-t1",
                        f"--rps={args.grpc_rate}", f"-d{body}", f"--log-file={log}",
                        "-H", "content-type: application/grpc", "-H", "te: trailers",
                        f"http://127.0.0.1:{port}/ratings.Ratings/Get",
                    ]  # fmt: skip
                    out = subprocess.run(
                        procs.pinned(LOAD_CORE, argv), capture_output=True, text=True,
                        check=False, timeout=args.seconds + 60,
                    )  # fmt: skip
                    cpu = sum(p.cpu() for p in ps) - cpu0
                finally:
                    for p in ps:
                        p.stop()
                res = parse_h2load(out.stdout, log)
                res.update(target=f"grpc-{name}", rep=rep)
                if ps and res["ok"]:
                    res["cpu_us_per_req"] = cpu / res["ok"] * 1e6
                rows.append(res)
                print(json.dumps(res), flush=True)
    finally:
        app.stop()
    return rows


def summarize(rows: list[dict[str, Any]]) -> str:
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["target"], []).append(r)
    lines = [
        "| target | rps (median) | CPU us/req | p50 ms | p99 ms | failed |",
        "|---|---|---|---|---|---|",
    ]

    def med(rs: list[dict[str, Any]], k: str) -> str:
        vals = [r[k] for r in rs if k in r]
        return f"{statistics.median(vals):,.1f}" if vals else "-"

    for name, rs in by.items():
        lines.append(
            f"| {name} | {med(rs, 'rps')} | {med(rs, 'cpu_us_per_req')} | {med(rs, 'p50_ms')} "
            f"| {med(rs, 'p99_ms')} | {sum(r['failed'] for r in rs)} |"
        )
    if by.get("haproxy"):
        ha = statistics.median([r["rps"] for r in by["haproxy"]])
        for t in [t for t in by if t.startswith("diktyo")]:
            d = statistics.median([r["rps"] for r in by[t]])
            lines.append(f"\n{t} / HAProxy saturation rps: {d / ha:.2f}x (target >= 0.4x)")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="1 s per target, one repetition")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=10, help="h2load -c")
    ap.add_argument("--streams", type=int, default=10, help="h2load -m (streams per connection)")
    ap.add_argument("--targets", default="direct,diktyo,haproxy,nginx")
    ap.add_argument("--grpc", action="store_true", help="also gRPC unary at --grpc-rate")
    ap.add_argument(
        "--base-src", default="",
        help="src directory of an older tree (built in place) for the diktyo-base targets",
    )  # fmt: skip
    ap.add_argument("--grpc-rate", type=int, default=1000, help="gRPC calls per second")
    ap.add_argument(
        "--grpc-paths", default="direct,mesh-diktyo,mesh-haproxy",
        help="gRPC paths; mesh-diktyo-h2 / mesh-diktyo-nghttp2 pin the sidecars' HTTP/2 codec",
    )  # fmt: skip
    a = ap.parse_args()
    global BASE_SRC
    BASE_SRC = a.base_src
    a.targets = a.targets.split(",")
    a.grpc_paths = a.grpc_paths.split(",")
    if a.smoke:
        a.reps, a.seconds = 1, 1.0
    missing = [t for t in ("h2load", "nginx", "haproxy", "taskset") if not shutil.which(t)]
    if missing:
        raise SystemExit(
            f"missing {', '.join(missing)}: apt-get install nghttp2-client nginx haproxy util-linux"
        )
    with tempfile.TemporaryDirectory(prefix="diktyo-h2bench-") as d:
        tmp = Path(d)
        rows = run_h2c(a, tmp)
        if a.grpc:
            rows += run_grpc(a, tmp)
        print(summarize(rows))


if __name__ == "__main__":
    main()
