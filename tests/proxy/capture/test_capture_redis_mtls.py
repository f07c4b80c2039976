"""A real Redis and its own client (and curl to an HTTP app) through two captured sidecars
under mTLS.

Pod A runs ``redis-cli`` (no proxy settings; it dials the Redis service's virtual IP), pod B
runs ``redis-server`` on 127.0.0.1. Both sidecars run as uid 1337 inside their namespace,
get their snapshot and their workload certificate from a control plane run by the test
(reached over a host link), and speak mTLS to each other. PeerAuthentication is STRICT, an
AuthorizationPolicy allows only the client's identity on port 6379, and both sidecars report
Istio's TCP metrics.
"""

from __future__ import annotations

import shutil
import sys

import pytest

from diktyo.api import load_text
from diktyo.control.model import (
    InboundPort,
    ProxyNode,
    Registry,
    Service,
    ServicePort,
    WorkloadInstance,
)
from diktyo.control.server import ControlPlane
from diktyo.snapshot.model import Node
from diktyo.testing import eventually

pytestmark = pytest.mark.slow

REDIS = "redis.default.svc.cluster.local"
VIP = "10.250.1.20"
WEB = "web.default.svc.cluster.local"
WEB_VIP = "10.250.1.21"
WEB_APP = (
    "import http.server as h\n"
    "class H(h.BaseHTTPRequestHandler):\n"
    "    def do_GET(self):\n"
    "        b = b'web:' + self.path.encode()\n"
    "        self.send_response(200); self.send_header('content-length', str(len(b)))\n"
    "        self.end_headers(); self.wfile.write(b)\n"
    "h.HTTPServer(('127.0.0.1', 8080), H).serve_forever()\n"
)
CLIENT_ID = "spiffe://cluster.local/ns/default/sa/client"
REDIS_ID = "spiffe://cluster.local/ns/default/sa/redis"

POLICIES = """\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: default}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: redis, namespace: default}
spec:
  selector: {matchLabels: {app: redis}}
  action: ALLOW
  rules:
  - from: [{source: {principals: [PRINCIPAL]}}]
    to: [{operation: {ports: ["6379", "8080"]}}]
"""


def _config(principal: str):  # type: ignore[no-untyped-def]  # LoadResult
    result = load_text(POLICIES.replace("PRINCIPAL", principal), "policies.yaml")
    assert result.errors == []
    return result


@pytest.fixture
def redis_ok() -> None:
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.skip("redis-server / redis-cli not installed (Debian: redis-server, redis-tools)")


async def test_redis_through_two_sidecars_mtls_strict_authz_metrics(pods, redis_ok) -> None:
    a, b = pods.a, pods.b
    redis = await b.start("redis-server", "--port", "6379", "--bind", "127.0.0.1", "--save", "",
                          "--appendonly", "no", "--daemonize", "no")  # fmt: skip
    web = await b.start(sys.executable, "-c", WEB_APP)
    cp = ControlPlane(observability=False, debounce=0.05)
    url = await cp.start(host="10.250.8.1")
    try:
        await cp.registry_source("test")(Registry(
            services=(Service(hostname=REDIS, short_name="redis", addresses=(VIP,),
                              ports=(ServicePort(6379, "tcp-redis", "TCP"),)),
                      Service(hostname=WEB, short_name="web", addresses=(WEB_VIP,),
                              ports=(ServicePort(8080, "http", "HTTP"),))),
            instances=(WorkloadInstance(name="redis-1", workload="redis", address=b.ip,
                                        ports={6379: 6379, 8080: 8080}, services=(REDIS, WEB),
                                        has_sidecar=True, labels={"app": "redis"},
                                        service_account="redis"),),
        ))  # fmt: skip
        await cp.config_source("test")(_config("cluster.local/ns/default/sa/client"))
        client = ProxyNode(node=Node(id="client-1.default", workload="client",
                                     service_account="client", labels={"app": "client"},
                                     interception_mode="REDIRECT"))  # fmt: skip
        server = ProxyNode(
            node=Node(id="redis-1.default", workload="redis", service_account="redis",
                      labels={"app": "redis"}, services=(REDIS, WEB), interception_mode="REDIRECT"),
            inbound=(InboundPort(service_port=6379, listen_port=0, app_port=6379),
                     InboundPort(service_port=8080, listen_port=0, app_port=8080)),
        )  # fmt: skip
        cp.add_proxy(client)
        cp.add_proxy(server)
        sa = await pods.sidecar_cp(a, url, client.node.id, cp.sidecar_token(client))
        sb = await pods.sidecar_cp(b, url, server.node.id, cp.sidecar_token(server))
        assert sa["listeners"]["virtualOutbound"] == 15001
        assert sb["listeners"]["virtualInbound"] == 15006

        async def cli(*args: str, uid: int | None = None) -> tuple[int, str]:
            rc, out, err = await a.arun("redis-cli", "-h", VIP, "-p", "6379", *args, uid=uid,
                                        timeout=20)  # fmt: skip
            return rc, (out + err).decode().strip()

        # HTTP through the same pair of sidecars: curl by VIP, mTLS, the HTTP inbound guard
        rc, out, err = await a.arun("curl", "-sS", "--max-time", "10", f"http://{WEB_VIP}:8080/x")
        assert (rc, out) == (0, b"web:/x"), err
        text = await pods.wait_metric(b, sb["admin"], "istio_requests_total", 1,
                                      reporter="destination", response_code="200",
                                      connection_security_policy="mutual_tls",
                                      source_principal=CLIENT_ID)  # fmt: skip
        # the same with an HTTP/2 client (prior knowledge): L7 through the capture listener
        rc, out, err = await a.arun("curl", "-sS", "--http2-prior-knowledge", "--max-time", "10",
                                    "-w", "\n%{http_version}", f"http://{WEB_VIP}:8080/h2")  # fmt: skip
        assert (rc, out) == (0, b"web:/h2\n2"), err
        text = await pods.wait_metric(b, sb["admin"], "istio_requests_total", 2,
                                      reporter="destination", response_code="200",
                                      connection_security_policy="mutual_tls",
                                      source_principal=CLIENT_ID)  # fmt: skip

        assert await cli("SET", "mesh", "diktyo") == (0, "OK")
        assert await cli("GET", "mesh") == (0, "diktyo")

        # the client sidecar saw an mTLS connection to redis's identity
        text = await pods.wait_metric(a, sa["admin"], "istio_tcp_connections_closed_total", 2,
                                 reporter="source", destination_service=REDIS)  # fmt: skip
        sel = {"reporter": "source", "destination_service": REDIS, "request_protocol": "tcp"}
        assert pods.metric(text, "istio_tcp_connections_opened_total", **sel) == 2
        assert (
            pods.metric(text, "istio_tcp_connections_opened_total", destination_principal=REDIS_ID)
            == 2
        )
        assert pods.metric(text, "istio_tcp_received_bytes_total", **sel) > 0
        assert pods.metric(text, "istio_tcp_sent_bytes_total", **sel) > 0
        # the server sidecar: reporter=destination, mutual_tls, the client's principal
        text = await pods.wait_metric(b, sb["admin"], "istio_tcp_connections_closed_total", 2,
                                 reporter="destination")  # fmt: skip
        assert pods.metric(text, "istio_tcp_connections_opened_total", reporter="destination",
                      connection_security_policy="mutual_tls", source_principal=CLIENT_ID) == 2  # fmt: skip
        # byte counts agree between the two sidecars (same bytes, seen from both ends)
        for name in ("istio_tcp_sent_bytes_total", "istio_tcp_received_bytes_total"):
            src = pods.metric(await pods.metrics(a, sa["admin"]), name, **sel)
            dst = pods.metric(text, name, reporter="destination")
            assert src == dst > 0, name

        async def redis_connections() -> int:
            rc, out, err = await b.arun("redis-cli", "-p", "6379", "INFO", "stats")
            assert rc == 0, err
            line = next(
                x for x in out.decode().splitlines() if x.startswith("total_connections_received:")
            )
            return int(line.split(":")[1])

        # STRICT: plaintext straight to the Redis pod (as uid 1337, so A's sidecar does not
        # capture it) is refused by B's sidecar; Redis never sees it
        before = await redis_connections()
        _, out = await cli("-h", b.ip, "PING", uid=1337)
        assert "PONG" not in out
        assert await redis_connections() == before + 1
        assert (
            pods.metric(
                await pods.metrics(b, sb["admin"]), "envoy_http_downstream_cx_refused_peer_authn"
            )
            >= 1
        )

        # the AuthorizationPolicy now allows another identity only: the client is refused
        await cp.config_source("test")(_config("cluster.local/ns/default/sa/other"))
        async def refused() -> str | None:
            _, out = await cli("GET", "mesh")
            return out if out != "diktyo" else None

        out = await eventually(refused, timeout=15, interval=0.2, what="policy change applied")
        assert "diktyo" not in out
        text = await pods.metrics(b, sb["admin"])
        assert pods.metric(text, "envoy_http_downstream_cx_rbac_denied") >= 1
        # a refused connection never reaches Redis: only our own INFO connection is counted
        before = await redis_connections()
        _, out = await cli("GET", "mesh")
        assert "diktyo" not in out
        assert await redis_connections() == before + 1
        # HTTP on the same workload is refused per request, as an HTTP policy is (403)
        rc, out, err = await a.arun("curl", "-sS", "--max-time", "10", f"http://{WEB_VIP}:8080/x")
        assert (rc, out) == (0, b"RBAC: access denied"), err
    finally:
        await cp.stop()
        redis.terminate()
        web.terminate()
