"""Configuration for every process the benchmark starts: upstream nginx, nginx and HAProxy
reverse proxies, and the diktyo sidecars' snapshots (a realistic VirtualService /
DestinationRule translated by hand into ``diktyo.snapshot.model`` terms)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

SMALL_BODY = "ok\n"
KIB_BODY = ("0123456789abcdef" * 64)[:1023] + "\n"  # exactly 1024 bytes
SERVICE = "upstream.bench.svc.cluster.local"


def _nginx_common(tmp: Path, name: str) -> str:
    return f"""daemon off;
master_process off;
worker_processes 1;
pid {tmp}/{name}.pid;
error_log {tmp}/{name}-error.log warn;
events {{ worker_connections 8192; multi_accept on; }}
"""


def _nginx_http_common(tmp: Path, name: str) -> str:
    temps = "\n".join(
        f"  {k}_temp_path {tmp}/{name}-{k};"
        for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""  access_log off;
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  default_type text/plain;
{temps}
"""


def upstream_nginx_conf(tmp: Path, port: int, port2: int | None = None) -> str:
    """A fast fixed-response server: ``/`` answers a 3-byte body, ``/1k`` 1 KiB. ``port2``: a
    second port on the same server, the "v2" endpoint of the diktyo configs."""
    second = f"\n    listen 127.0.0.1:{port2} backlog=4096;" if port2 else ""
    return (
        _nginx_common(tmp, "upstream")
        + "http {\n"
        + _nginx_http_common(tmp, "upstream")
        + f"""  server {{
    listen 127.0.0.1:{port} backlog=4096;{second}
    location = /1k {{ return 200 "{KIB_BODY.rstrip()}\\n"; }}
    location / {{ return 200 "{SMALL_BODY.rstrip()}\\n"; }}
  }}
}}
"""
    )


def nginx_proxy_conf(tmp: Path, port: int, upstream_port: int) -> str:
    """nginx, one worker, reverse proxy with a keepalive pool to the upstream."""
    return (
        _nginx_common(tmp, "nginx")
        + "http {\n"
        + _nginx_http_common(tmp, "nginx")
        + f"""  upstream up {{
    server 127.0.0.1:{upstream_port};
    keepalive 128;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
  }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{
      proxy_pass http://up;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}
}}
"""
    )


def haproxy_conf(port: int, upstream_port: int) -> str:
    """HAProxy, one thread, HTTP mode, keep-alive and connection reuse to the upstream."""
    return f"""global
  nbthread 1
  maxconn 4096
  tune.bufsize 16384

defaults
  mode http
  timeout connect 5s
  timeout client 120s
  timeout server 120s
  timeout http-keep-alive 120s
  option http-keep-alive
  http-reuse always

frontend fe
  bind 127.0.0.1:{port}
  default_backend be

backend be
  server s1 127.0.0.1:{upstream_port} maxconn 4096
"""


# --------------------------------------------------------------------------- diktyo


def _domains(host: str, port: int) -> list[str]:
    short = host.split(".")[0]
    ns = ".".join(host.split(".")[:2])
    names = [short, ns, host]
    return names + [f"{n}:{port}" for n in names] + ["127.0.0.1", "localhost"]


def _endpoint(address: str, port: int, version: str) -> dict[str, Any]:
    return {
        "address": address,
        "port": port,
        "labels": {"app": "upstream", "version": version},
        "workload": f"upstream-{version}",
    }


def _routes(cluster_prefix: str) -> list[dict[str, Any]]:
    """A VirtualService with several rules, as users write them:

    1. header ``x-canary: true`` -> subset v2 (exact header match)
    2. ``/api/v2/`` prefix, or header ``end-user`` matching a regex -> v2
    3. ``/static/`` prefix -> v1 with a retry policy and a timeout
    4. ``/1k`` exact and ``/`` prefix -> 99/1 weighted split v1/v2 (canary)

    The benchmark's requests (``GET /`` and ``GET /1k``) fall through to the last rule, so
    every request walks the whole table: the realistic worst case.
    """

    def wc(subset: str, weight: int) -> dict[str, Any]:
        return {
            "cluster": f"{cluster_prefix}|{subset}|{SERVICE}",
            "weight": weight,
            "host": SERVICE,
            "subset": subset,
        }

    return [
        {
            "name": "canary-header",
            "matches": [
                {"headers": [{"name": "x-canary", "match": {"kind": "exact", "value": "true"}}]}
            ],
            "clusters": [wc("v2", 100)],
            "source": {"name": "upstream", "rule": 0},
        },
        {
            "name": "api-v2",
            "matches": [
                {"uri": {"kind": "prefix", "value": "/api/v2/"}},
                {
                    "headers": [
                        {"name": "end-user", "match": {"kind": "regex", "value": "^(jason|ann)$"}}
                    ]
                },
            ],
            "clusters": [wc("v2", 100)],
            "source": {"name": "upstream", "rule": 1},
        },
        {
            "name": "static",
            "matches": [
                {
                    "uri": {"kind": "prefix", "value": "/static/"},
                    "method": {"kind": "exact", "value": "GET"},
                }
            ],
            "clusters": [wc("v1", 100)],
            "timeout": 5.0,
            "retries": {"attempts": 3, "per_try_timeout": 2.0},
            "source": {"name": "upstream", "rule": 2},
        },
        {
            "name": "default",
            "matches": [
                {"uri": {"kind": "exact", "value": "/1k"}},
                {"uri": {"kind": "prefix", "value": "/"}},
            ],
            "clusters": [wc("v1", 99), wc("v2", 1)],
            "source": {"name": "upstream", "rule": 3},
        },
    ]


def _outbound_clusters(
    port: int, targets: list[tuple[str, int]], has_sidecar: bool
) -> list[dict[str, Any]]:
    """A DestinationRule with subsets v1 and v2 (both on the same fast upstream here),
    LEAST_REQUEST (Istio's default), connection-pool limits and outlier detection on."""
    # has_sidecar stays False even on the mesh path: the sidecar-to-sidecar hop is plaintext
    # here, like the HAProxy pair it is compared with (no auto-mTLS)
    del has_sidecar
    clusters = []
    for subset in ("", "v1", "v2"):
        eps = [_endpoint(addr, p, subset or "v1") for addr, p in targets]
        clusters.append(
            {
                "name": f"outbound|{port}|{subset}|{SERVICE}",
                "service": SERVICE,
                "port": port,
                "subset": subset,
                "direction": "outbound",
                "endpoints": eps,
                "lb": {"simple": "LEAST_REQUEST"},
                "pool": {"max_connections": 10000, "http1_max_pending_requests": 10000},
                "outlier": {
                    "consecutive_5xx_errors": 5,
                    "interval": 10.0,
                    "base_ejection_time": 30.0,
                },
                "policy_source": "DestinationRule default/upstream",
            }
        )
    return clusters


def client_sidecar_snapshot(
    listen_port: int, targets: list[tuple[str, int]], *, via_sidecar: bool, version: str = "bench-1"
) -> dict[str, Any]:
    """The outbound (client) sidecar: a per-upstream local listener with ``default_host`` so
    wrk can use a plain URL, the VirtualService above and the DestinationRule's subsets."""
    svc_port = 80
    return {
        "version": version,
        "node": {
            "id": "bench-client.default",
            "workload": "bench-client",
            "labels": {"app": "bench-client", "version": "v1"},
        },
        "listeners": [
            {
                "name": "outbound-upstream",
                "direction": "outbound",
                "address": "127.0.0.1",
                "port": listen_port,
                "route_table": "outbound",
                "default_host": SERVICE,
                "service_port": svc_port,
            }
        ],
        "route_tables": [
            {
                "name": "outbound",
                "virtual_hosts": [
                    {
                        "name": f"{SERVICE}:{svc_port}",
                        "domains": _domains(SERVICE, svc_port),
                        "routes": _routes(f"outbound|{svc_port}"),
                    }
                ],
            }
        ],
        "clusters": _outbound_clusters(svc_port, targets, via_sidecar),
    }


def server_sidecar_snapshot(
    listen_port: int, app_port: int, version: str = "bench-1"
) -> dict[str, Any]:
    """The inbound (server) sidecar in front of the upstream app: ``inbound|80||``."""
    cluster = "inbound|80||"
    return {
        "version": version,
        "node": {
            "id": "upstream-v1-1.default",
            "workload": "upstream-v1",
            "labels": {"app": "upstream", "version": "v1"},
            "services": [SERVICE],
        },
        "listeners": [
            {
                "name": "inbound-80",
                "direction": "inbound",
                "address": "127.0.0.1",
                "port": listen_port,
                "cluster": cluster,
                "service_port": 80,
            }
        ],
        "clusters": [
            {
                "name": cluster,
                "service": SERVICE,
                "port": 80,
                "direction": "inbound",
                "endpoints": [_endpoint("127.0.0.1", app_port, "v1")],
                "lb": {"simple": "PASSTHROUGH"},
            }
        ],
    }


# --------------------------------------------------------------------------- Istio YAML


def istio_yaml(v1: tuple[str, int], v2: tuple[str, int]) -> str:
    """The same mesh as the hand-written snapshot above, as a user writes it: a ServiceEntry
    (STATIC endpoints v1 and v2), a DestinationRule with subsets and traffic policy, and a
    VirtualService whose four rules the benchmark's requests walk to the last one."""
    return f"""apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: upstream, namespace: bench}}
spec:
  hosts: [{SERVICE}]
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
  - {{number: 80, name: http, protocol: HTTP}}
  endpoints:
  - address: {v1[0]}
    ports: {{http: {v1[1]}}}
    labels: {{app: upstream, version: v1}}
  - address: {v2[0]}
    ports: {{http: {v2[1]}}}
    labels: {{app: upstream, version: v2}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: upstream, namespace: bench}}
spec:
  host: {SERVICE}
  trafficPolicy:
    loadBalancer: {{simple: LEAST_REQUEST}}
    connectionPool:
      tcp: {{maxConnections: 10000}}
      http: {{http1MaxPendingRequests: 10000}}
    outlierDetection:
      consecutive5xxErrors: 5
      interval: 10s
      baseEjectionTime: 30s
  subsets:
  - name: v1
    labels: {{version: v1}}
  - name: v2
    labels: {{version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: upstream, namespace: bench}}
spec:
  hosts: [{SERVICE}]
  http:
  - name: canary-header
    match:
    - headers:
        x-canary: {{exact: "true"}}
    route:
    - destination: {{host: {SERVICE}, subset: v2}}
  - name: api-v2
    match:
    - uri: {{prefix: /api/v2/}}
    - headers:
        end-user: {{regex: "^(jason|ann)$"}}
    route:
    - destination: {{host: {SERVICE}, subset: v2}}
  - name: static
    match:
    - uri: {{prefix: /static/}}
      method: {{exact: GET}}
    timeout: 5s
    retries: {{attempts: 3, perTryTimeout: 2s}}
    route:
    - destination: {{host: {SERVICE}, subset: v1}}
  - name: default
    match:
    - uri: {{exact: /1k}}
    - uri: {{prefix: /}}
    route:
    - destination: {{host: {SERVICE}, subset: v1}}
      weight: 99
    - destination: {{host: {SERVICE}, subset: v2}}
      weight: 1
"""
