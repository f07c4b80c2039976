"""KubeWatcher and the control plane in a pod, against recorded API objects served by a small
list/watch server on 127.0.0.1 (``diktyo.testing.kube_api``); no cluster, no client mocks."""

from __future__ import annotations

import asyncio
import json
import os
import re
import ssl
import sys
from pathlib import Path
from typing import Any

import aiohttp

from diktyo.control.ingest.kubernetes import (
    CONFIG_RESOURCES,
    KubeWatcher,
    ProxySync,
    config_from_objects,
    in_cluster,
    proxies_from_objects,
)
from diktyo.control.inject.certs import webhook_certs
from diktyo.control.model import InboundPort, Registry
from diktyo.control.server import ControlPlane
from diktyo.testing.kube_api import FakeApiServer, projected_token
from diktyo.testing.wait import eventually

NS = "bookinfo"
SVC = {"metadata": {"name": "reviews", "namespace": NS, "labels": {"app": "reviews"}},
       "spec": {"clusterIP": "10.96.44.3", "selector": {"app": "reviews"}, "type": "ClusterIP",
                "ports": [{"name": "http", "port": 9080, "protocol": "TCP", "targetPort": 9080}]}}
SLICE = {"metadata": {"name": "reviews-7xk2p", "namespace": NS,
                      "labels": {"kubernetes.io/service-name": "reviews"}},
         "addressType": "IPv4",
         "endpoints": [{"addresses": ["10.244.1.7"], "conditions": {"ready": True},
                        "targetRef": {"kind": "Pod", "name": "reviews-v1-7d9c5-abcde",
                                      "namespace": NS}}],
         "ports": [{"name": "http", "port": 9080, "protocol": "TCP"}]}
POD = {"metadata": {"name": "reviews-v1-7d9c5-abcde", "namespace": NS,
                    "labels": {"app": "reviews", "version": "v1"},
                    "annotations": {"sidecar.istio.io/status": '{"containers":["diktyo-proxy"]}'},
                    "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                         "name": "reviews-v1-7d9c5", "controller": True}]},
       "spec": {"serviceAccountName": "bookinfo-reviews", "initContainers": [{"name": "diktyo-init"}],
                "containers": [{"name": "reviews"}, {"name": "diktyo-proxy"}]},
       "status": {"phase": "Running", "podIP": "10.244.1.7"}}
PLAIN_POD = {"metadata": {"name": "job-x", "namespace": NS},
             "spec": {"containers": [{"name": "job"}]},
             "status": {"phase": "Running", "podIP": "10.244.1.9"}}
VS = {"metadata": {"name": "reviews", "namespace": NS},
      "spec": {"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "reviews"}}]}]}}
ISTIO_GW = {"metadata": {"name": "web", "namespace": NS},
            "spec": {"selector": {"istio": "ingressgateway"},
                     "servers": [{"port": {"number": 80, "name": "http", "protocol": "HTTP"},
                                  "hosts": ["*"]}]}}
K8S_GW = {"metadata": {"name": "web", "namespace": NS},
          "spec": {"gatewayClassName": "istio",
                   "listeners": [{"name": "http", "port": 80, "protocol": "HTTP"}]}}
ROUTE = {"metadata": {"name": "reviews", "namespace": NS},
         "spec": {"parentRefs": [{"name": "web"}],
                  "rules": [{"backendRefs": [{"name": "reviews", "port": 9080}]}]}}

CORE = {"/api/v1/services": ("v1", "Service"),
        "/apis/discovery.k8s.io/v1/endpointslices": ("discovery.k8s.io/v1", "EndpointSlice"),
        "/api/v1/pods": ("v1", "Pod")}
ROUTES = "/apis/gateway.networking.k8s.io/v1/httproutes"


async def _api(tls: ssl.SSLContext | None = None) -> FakeApiServer:
    api = FakeApiServer(tls=tls)
    for path, (av, kind) in CORE.items():
        api.add_resource(path, av, kind)
    for res in CONFIG_RESOURCES:
        api.add_resource(res.path, res.api_version, res.kind, installed=res.path != ROUTES)
    await api.start()
    await api.put("/api/v1/services", json.loads(json.dumps(SVC)))
    await api.put("/apis/discovery.k8s.io/v1/endpointslices", json.loads(json.dumps(SLICE)))
    await api.put("/api/v1/pods", json.loads(json.dumps(POD)))
    await api.put("/api/v1/pods", json.loads(json.dumps(PLAIN_POD)))
    await api.put("/apis/networking.istio.io/v1/virtualservices", json.loads(json.dumps(VS)))
    await api.put("/apis/networking.istio.io/v1/gateways", json.loads(json.dumps(ISTIO_GW)))
    await api.put("/apis/gateway.networking.k8s.io/v1/gateways", json.loads(json.dumps(K8S_GW)))
    return api


def test_gateway_api_gateway_is_not_istios() -> None:
    objs = [{"apiVersion": "networking.istio.io/v1", "kind": "Gateway", **ISTIO_GW},
            {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway", **K8S_GW}]
    res = config_from_objects(objs)
    assert sorted(r.key for r in res.resources) == [
        "Gateway.gateway.networking.k8s.io/bookinfo/web", "Gateway/bookinfo/web"]


def test_proxies_from_recorded_pods() -> None:
    objs = [{"apiVersion": "v1", "kind": "Service", **SVC},
            {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", **SLICE},
            {"apiVersion": "v1", "kind": "Pod", **POD},
            {"apiVersion": "v1", "kind": "Pod", **PLAIN_POD},
            {"apiVersion": "v1", "kind": "Pod", **POD, "metadata": {**POD["metadata"], "name": "done"},
                                                   "status": {"phase": "Succeeded", "podIP": "10.244.1.8"}}]
    (proxy,) = proxies_from_objects(objs, trust_domain="corp.example")
    node = proxy.node
    assert node.id == "reviews-v1-7d9c5-abcde.bookinfo"  # what the sidecar derives from its env
    assert (node.workload, node.namespace, node.service_account) == ("reviews-v1", NS, "bookinfo-reviews")
    assert node.services == ("reviews.bookinfo.svc.cluster.local",)
    assert node.trust_domain == "corp.example" and node.labels["version"] == "v1"
    assert proxy.address == "0.0.0.0" and proxy.outbound_port == 0  # captured: no HTTP proxy port
    assert node.interception_mode == "REDIRECT"  # the diktyo-init container's iptables rules
    assert proxy.inbound == (InboundPort(service_port=9080, listen_port=0, app_port=9080),)


def test_in_cluster_detection(tmp_path: Path) -> None:
    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    assert in_cluster(env, str(tmp_path)) is None  # no service account token
    (tmp_path / "token").write_text("tok\n")
    (tmp_path / "namespace").write_text("diktyo-system")
    got = in_cluster(env, str(tmp_path))
    assert got is not None and got.base_url == "https://10.96.0.1:443"
    assert got.namespace == "diktyo-system" and got.token_file == str(tmp_path / "token")
    assert in_cluster({}, str(tmp_path)) is None  # not in a pod
    v6 = in_cluster({"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443"}, str(tmp_path))
    assert v6 is not None and v6.base_url == "https://[fd00::1]:443"


async def test_watcher_serves_without_missing_crds_and_picks_them_up(tmp_path: Path) -> None:
    api = await _api()
    token = tmp_path / "token"
    token.write_text("t0ken\n")
    configs: list[list[str]] = []
    registries: list[Registry] = []
    proxies: list[list[str]] = []

    async def on_config(res: Any) -> None:
        configs.append(sorted(r.key for r in res.resources))

    async def on_registry(reg: Registry) -> None:
        registries.append(reg)

    async def on_proxies(ps: list[Any]) -> None:
        proxies.append([p.node.id for p in ps])

    watcher = KubeWatcher(base_url=api.url, token_file=str(token), on_config=on_config,
                          on_registry=on_registry, on_proxies=on_proxies, retry_delay=0.05,
                          crd_poll=0.2)
    task = asyncio.create_task(watcher.run())
    try:
        # HTTPRoute's CRD is not installed: everything else is served anyway
        await eventually(lambda: configs and "VirtualService/bookinfo/reviews" in configs[-1],
                         timeout=15)
        assert "Gateway/bookinfo/web" in configs[-1]  # Istio's Gateway ...
        assert "Gateway.gateway.networking.k8s.io/bookinfo/web" in configs[-1]  # ... and the Gateway API's
        await eventually(lambda: registries and proxies, timeout=15)
        assert [s.hostname for s in registries[-1].services] == ["reviews.bookinfo.svc.cluster.local"]
        assert proxies[-1] == ["reviews-v1-7d9c5-abcde.bookinfo"]  # the plain pod has no sidecar
        # the CRD gets installed and a route created: picked up without a restart
        api.install(ROUTES)
        await api.put(ROUTES, json.loads(json.dumps(ROUTE)))
        await eventually(lambda: "HTTPRoute.gateway.networking.k8s.io/bookinfo/reviews" in configs[-1],
                         timeout=15)
        # an edit and a deletion arrive through the watch
        await api.delete("/apis/networking.istio.io/v1/gateways", NS, "web")
        await eventually(lambda: "Gateway/bookinfo/web" not in configs[-1], timeout=15)
        assert "Gateway.gateway.networking.k8s.io/bookinfo/web" in configs[-1]  # not the other one
        token.write_text("rotated\n")  # the kubelet rotates the projected token
        api.token = "rotated"
        await api.end_watches()  # the next requests carry the new token
        await api.delete("/api/v1/pods", NS, "reviews-v1-7d9c5-abcde")
        await eventually(lambda: proxies[-1] == [], timeout=15)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await api.close()
    auths = {auth for path, _, auth in api.requests}
    assert auths <= {"Bearer t0ken", "Bearer rotated"} and "Bearer rotated" in auths
    assert any(p == ROUTES for p, _, _ in api.requests)


async def test_proxy_sync_adds_and_removes_only_its_own() -> None:
    cp = ControlPlane(observability=False)
    objs = [{"apiVersion": "v1", "kind": "Pod", **POD}]
    sync = ProxySync(cp)
    await sync(proxies_from_objects(objs))
    assert "reviews-v1-7d9c5-abcde.bookinfo" in cp.proxies
    from diktyo.control.model import ProxyNode
    from diktyo.snapshot.model import Node

    cp.add_proxy(ProxyNode(node=Node(id="vm-1.default", workload="vm")))  # registered by API
    await sync([])
    assert list(cp.proxies) == ["vm-1.default"]


def _base_env(tmp_path: Path) -> dict[str, str]:
    env = {k: os.environ[k] for k in ("PATH", "PYTHONPATH", "LANG") if k in os.environ}
    env["HOME"] = str(tmp_path)
    return env


async def test_control_plane_in_a_pod_serves_a_sidecar_from_api_objects(tmp_path: Path) -> None:
    """API objects -> `diktyo control-plane` in a "pod" -> a sidecar started with only its env."""
    certs = webhook_certs("kubernetes", "default", ips=("127.0.0.1",))
    (tmp_path / "api.crt").write_bytes(certs.cert_pem)
    (tmp_path / "api.key").write_bytes(certs.key_pem)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(tmp_path / "api.crt", tmp_path / "api.key")
    api = await _api(tls)
    tok = {  # projected tokens the kubelet gave the pods (TokenReview answers)
        name: api.issue(user, auds, name) for name, user, auds in [
            ("reviews-pod-token", "system:serviceaccount:bookinfo:bookinfo-reviews", ("diktyo-ca",)),
            ("ratings-pod-token", "system:serviceaccount:bookinfo:bookinfo-ratings", ("diktyo-ca",)),
            ("api-audience-token", "system:serviceaccount:bookinfo:bookinfo-reviews",
             ("https://kubernetes.default.svc",)),
            ("user-token", "alice@example.com", ("diktyo-ca",)),
        ]
    }
    tok["garbage"] = "garbage"
    (tmp_path / "pod-token").write_text(tok["reviews-pod-token"] + "\n")
    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "token").write_text("t0ken")
    (sa / "ca.crt").write_bytes(certs.ca_pem)
    (sa / "namespace").write_text("diktyo-system")
    port = api.url.rsplit(":", 1)[1]
    env = {**_base_env(tmp_path), "KUBERNETES_SERVICE_HOST": "127.0.0.1",
           "KUBERNETES_SERVICE_PORT": port, "DIKTYO_KUBE_SA_DIR": str(sa),
           "DIKTYO_HOME": str(tmp_path / "home")}
    cp = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "diktyo.cli.main", "control-plane", "--port", "0", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    sidecar = None
    try:
        assert cp.stdout is not None
        lines = []
        while not any("watching the API server" in ln for ln in lines):
            line = (await asyncio.wait_for(cp.stdout.readline(), 30)).decode()
            assert line, (await cp.stderr.read()).decode() if cp.stderr else ""
            lines.append(line)
        url = re.search(r"serving on (http://\S+?)[,\s]", "".join(lines))
        assert url, lines
        cp_url = url.group(1)
        admin = (tmp_path / "home" / "admin-token").read_text().strip()
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin}"}) as s:
            async def has_proxy() -> bool:
                async with s.get(cp_url + "/v1/proxies") as r:
                    return "reviews-v1-7d9c5-abcde.bookinfo" in await r.text()

            await eventually(has_proxy, timeout=20)
            async with s.get(cp_url + "/v1/config") as r:
                config = json.dumps(await r.json())
            assert "VirtualService" in config and "gateway.networking.k8s.io" in config
        # sidecar auth stays on: only the pod's own service account may fetch its snapshot
        snap = cp_url + "/v1/snapshot?node=reviews-v1-7d9c5-abcde.bookinfo"
        async with aiohttp.ClientSession() as s:
            for name, want in [("", 401), ("ratings-pod-token", 403), ("api-audience-token", 401),
                               ("user-token", 401), ("garbage", 401)]:
                token = tok.get(name, "")
                headers = {"Authorization": f"Bearer {token}"} if token else {}
                async with s.get(snap, headers=headers) as r:
                    assert r.status == want, (token, r.status, await r.text())
        # workload certificates: the projected token gets one for exactly its own identity
        await _check_certificates(cp_url, tok)
        # the injected sidecar of that pod: only the environment the injector sets
        side_env = {**_base_env(tmp_path), "DIKTYO_CONTROL_PLANE": cp_url,
                    "POD_NAME": "reviews-v1-7d9c5-abcde", "POD_NAMESPACE": NS,
                    "SERVICE_ACCOUNT": "bookinfo-reviews", "DIKTYO_LOG_LEVEL": "info",
                    "INSTANCE_IP": "127.0.0.1", "DIKTYO_ADMIN_PORT": "0", "DIKTYO_STATUS_PORT": "0",
                    "DIKTYO_READINESS_PORT": "0", "DIKTYO_OUTBOUND_PORT": "0",
                    "DIKTYO_ADMIN_TOKEN_FILE": str(tmp_path / "sidecar-admin"),
                    "DIKTYO_KUBE_TOKEN_FILE": str(tmp_path / "pod-token")}
        sidecar = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "diktyo.proxy", env=side_env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        assert sidecar.stdout is not None
        try:
            line = await asyncio.wait_for(sidecar.stdout.readline(), 30)
        except TimeoutError:
            sidecar.terminate()
            _, err = await sidecar.communicate()
            raise AssertionError(f"sidecar not ready: {err.decode(errors='replace')[-3000:]}") from None
        assert line, (await sidecar.stderr.read()).decode() if sidecar.stderr else ""
        ready = json.loads(line)
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{ready['readiness']}/healthz/ready") as r:
                assert r.status == 200
            async with s.get(f"http://127.0.0.1:{ready['admin']}/config_dump") as r:
                dump = await r.json()
        node = dump["node"]
        assert node["id"] == "reviews-v1-7d9c5-abcde.bookinfo"
        assert node["service_account"] == "bookinfo-reviews" and node["workload"] == "reviews-v1"
        reviewed = [r["spec"] for r in api.reviews]
        assert {"token": tok["reviews-pod-token"], "audiences": ["diktyo-ca"]} in reviewed
        # tokens that cannot be projected service-account tokens cost no TokenReview
        assert not {tok["user-token"], tok["api-audience-token"], "garbage"} & {
            r["token"] for r in reviewed
        }
    finally:
        errs = {}
        for name, proc in (("sidecar", sidecar), ("cp", cp)):
            if proc is not None and proc.returncode is None:
                proc.terminate()
                errs[name] = (await asyncio.wait_for(proc.communicate(), 20))[1].decode(errors="replace")
        await api.close()
    # the sidecar asked for its certificate with its projected token before its snapshot
    assert ("workload certificate for spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews "
            "installed") in errs["sidecar"], errs["sidecar"][-3000:]


async def _check_certificates(cp_url: str, tok: dict[str, str]) -> None:
    """POST /v1/certificates with projected service-account tokens (TokenReview, as Istio's CA
    takes Kubernetes JWTs): the token's own identity 200, another one's 403, garbage 401."""
    from cryptography import x509

    from diktyo.security.csr import make_key_and_csr

    reviews = "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews"
    async with aiohttp.ClientSession() as s:
        async def ask(token: str, spiffe: str, bearer: bool = False) -> tuple[int, dict[str, Any]]:
            body: dict[str, str] = {"csr": make_key_and_csr(spiffe).csr_pem}
            headers = {"Authorization": f"Bearer {token}"} if bearer else {}
            if not bearer:
                body["token"] = token
            async with s.post(cp_url + "/v1/certificates", json=body, headers=headers) as r:
                return r.status, await r.json()

        status, out = await ask(tok["reviews-pod-token"], reviews)
        assert status == 200, out
        assert out["spiffe_id"] == reviews
        leaf = x509.load_pem_x509_certificate(out["cert_chain"].encode())
        sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert [str(u) for u in sans.get_values_for_type(x509.UniformResourceIdentifier)] == [reviews]
        status, out = await ask(tok["reviews-pod-token"], reviews, bearer=True)  # as a Bearer header
        assert status == 200 and out["spiffe_id"] == reviews
        # another service account's token cannot get this identity, nor this one another's
        status, out = await ask(tok["ratings-pod-token"], reviews)
        assert status == 403 and "asks for" in out["error"], out
        status, out = await ask(tok["reviews-pod-token"],
                                "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-ratings")
        assert status == 403, out
        for token in ("garbage", "api-audience-token", "user-token"):
            status, out = await ask(tok[token], reviews)
            assert status == 401 and "TokenReview" in out["error"], (token, out)


async def test_token_reviewer_answers_and_caches() -> None:
    from diktyo.control.ingest.kubernetes import TokenReviewer

    api = FakeApiServer(token="cp-token")
    tok = {name: api.issue(user, auds, name) for name, user, auds in [
        ("pod", "system:serviceaccount:shop:web", ("diktyo-ca",)),
        ("kube-api", "system:serviceaccount:shop:web", ("https://kubernetes.default.svc",)),
        ("node", "system:node:worker-1", ("diktyo-ca",)),
        ("forged", "system:serviceaccount:shop:web", ("diktyo-ca",)),
    ]}
    del api.tokens[tok["forged"]]  # well-formed, but the API server never issued it
    await api.start()
    now = [0.0]
    reviewer = TokenReviewer(api.url, token="cp-token", ttl=60, negative_ttl=5,
                             clock=lambda: now[0])
    try:
        assert await reviewer(tok["pod"]) == ("shop", "web")
        assert await reviewer(tok["pod"]) == ("shop", "web") and reviewer.reviews == 1  # cached
        # refused without asking: a token for the API server, not for diktyo; not a service
        # account; not a JWT; too long; expired
        expired = projected_token("system:serviceaccount:shop:web", ("diktyo-ca",), exp=1.0)
        for token in (tok["kube-api"], tok["node"], "nope", "a.b.c", "x" * 9000, expired):
            assert await reviewer(token) is None
        assert reviewer.reviews == 1 and reviewer.prechecked == 6
        assert await reviewer(tok["forged"]) is None and reviewer.reviews == 2  # well-formed
        now[0] = 61.0
        assert await reviewer(tok["pod"]) == ("shop", "web") and reviewer.reviews == 3  # expired
        reviewer.token = "wrong"  # the control plane's own token is refused: nobody passes
        reviewer.cache.clear()
        assert await reviewer(tok["pod"]) is None
        assert all(r["spec"]["audiences"] == ["diktyo-ca"] for r in api.reviews)
    finally:
        await reviewer.close()
        await api.close()
    # API server gone: refused, not crashed
    assert await reviewer(projected_token("system:serviceaccount:a:b", ("diktyo-ca",))) is None
    await reviewer.close()


def test_grpcroutes_are_config_too() -> None:
    route = {"metadata": {"name": "ratings", "namespace": NS},
             "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "ratings"}],
                      "rules": [{"matches": [{"method": {"service": "ratings.Ratings"}}],
                                 "backendRefs": [{"name": "ratings", "port": 7070}]}]}}
    res = config_from_objects([{"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GRPCRoute",
                                **route}])  # fmt: skip
    assert [r.key for r in res.resources] == ["GRPCRoute.gateway.networking.k8s.io/bookinfo/ratings"]
    assert any(r.path == "/apis/gateway.networking.k8s.io/v1/grpcroutes" for r in CONFIG_RESOURCES)
