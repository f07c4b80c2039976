"""The admission webhook over real TLS on 127.0.0.1: recorded AdmissionReview v1 payloads in,
patches applied with the jsonpatch package and compared with golden pods."""

from __future__ import annotations

import base64
import copy
import json
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import jsonpatch
import pytest

from diktyo.control.inject.certs import webhook_certs
from diktyo.control.inject.manifest import dump_docs
from diktyo.control.inject.pod import inject_pod
from diktyo.control.inject.webhook import WebhookServer

TESTDATA = Path(__file__).parent / "testdata" / "webhook"
TIMEOUT = aiohttp.ClientTimeout(total=10)


@pytest.fixture
async def webhook(tmp_path: Path) -> AsyncIterator[tuple[WebhookServer, str, ssl.SSLContext]]:
    certs = webhook_certs("diktyo", "diktyo-system", ips=("127.0.0.1",))
    (tmp_path / "tls.crt").write_bytes(certs.cert_pem)
    (tmp_path / "tls.key").write_bytes(certs.key_pem)
    server = WebhookServer(cert_file=str(tmp_path / "tls.crt"), key_file=str(tmp_path / "tls.key"))
    port = await server.start("127.0.0.1", 0)
    client_ctx = ssl.create_default_context(cadata=certs.ca_pem.decode())
    try:
        yield server, f"https://127.0.0.1:{port}", client_ctx
    finally:
        await server.stop()


async def _post(url: str, ctx: ssl.SSLContext, body: bytes) -> tuple[int, Any]:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s, s.post(
            url + "/inject", data=body, ssl=ctx, headers={"Content-Type": "application/json"}) as r:
        text = await r.text()
        return r.status, (json.loads(text) if r.content_type == "application/json" else text)


def _review(case: str) -> dict[str, Any]:
    return json.loads((TESTDATA / f"{case}.review.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("case", ["deployment_pod", "named_ports"])
async def test_injects_with_json_patch(webhook: Any, case: str, golden: Callable[[Path, str], None]) -> None:
    server, url, ctx = webhook
    review = _review(case)
    status, answer = await _post(url, ctx, json.dumps(review).encode())
    assert status == 200
    assert answer["apiVersion"] == "admission.k8s.io/v1" and answer["kind"] == "AdmissionReview"
    resp = answer["response"]
    assert resp["uid"] == review["request"]["uid"]
    assert resp["allowed"] is True and resp["patchType"] == "JSONPatch"
    ops = json.loads(base64.b64decode(resp["patch"]))
    pod = review["request"]["object"]
    patched = jsonpatch.apply_patch(copy.deepcopy(pod), ops)
    golden(TESTDATA / f"{case}.patched.yaml", dump_docs([patched]))
    assert patched == inject_pod(pod, namespace=review["request"]["namespace"])
    # existing containers and volumes are only appended to, never rewritten
    assert all(op["op"] == "add" for op in ops), ops
    assert server.stats.injected == 1


@pytest.mark.parametrize("case", ["opt_out", "service"])
async def test_allows_without_patch(webhook: Any, case: str) -> None:
    server, url, ctx = webhook
    review = _review(case)
    status, answer = await _post(url, ctx, json.dumps(review).encode())
    assert status == 200
    assert answer["response"] == {"uid": review["request"]["uid"], "allowed": True}
    assert server.stats.skipped == 1


async def test_bad_annotation_denies_with_reason(webhook: Any) -> None:
    _, url, ctx = webhook
    review = _review("deployment_pod")
    review["request"]["object"]["metadata"]["annotations"] = {
        "traffic.sidecar.istio.io/excludeOutboundPorts": "5432,postgres"}
    status, answer = await _post(url, ctx, json.dumps(review).encode())
    assert status == 200
    resp = answer["response"]
    assert resp["allowed"] is False and "patch" not in resp
    assert resp["status"]["code"] == 400
    assert "excludeOutboundPorts" in resp["status"]["message"] and "'postgres'" in resp["status"]["message"]


def _broken() -> list[tuple[str, bytes, str]]:
    good = _review("deployment_pod")
    no_uid = copy.deepcopy(good)
    del no_uid["request"]["uid"]
    v1beta = copy.deepcopy(good)
    v1beta["apiVersion"] = "admission.k8s.io/v2"
    no_spec = copy.deepcopy(good)
    no_spec["request"]["object"] = {"kind": "Pod", "metadata": {}}
    no_request = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}
    return [
        ("not json", b"{not json", "not JSON"),
        ("array", b"[1, 2]", "JSON object"),
        ("wrong kind", json.dumps({**good, "kind": "Pod"}).encode(), "kind must be AdmissionReview"),
        ("wrong version", json.dumps(v1beta).encode(), "apiVersion must be admission.k8s.io/v1"),
        ("no request", json.dumps(no_request).encode(), "request is missing"),
        ("no uid", json.dumps(no_uid).encode(), "request.uid"),
        ("no containers", json.dumps(no_spec).encode(), "spec.containers"),
        ("object is a string", json.dumps({**good, "request": {**good["request"], "object": "x"}}).encode(),
         "request.object"),
    ]


@pytest.mark.parametrize(("name", "body", "needle"), _broken(), ids=[b[0] for b in _broken()])
async def test_malformed_review_is_400(webhook: Any, name: str, body: bytes, needle: str) -> None:
    server, url, ctx = webhook
    status, text = await _post(url, ctx, body)
    assert status == 400, text
    assert needle in text and "malformed AdmissionReview" in text
    assert server.stats.malformed == 1
    # and the server still answers good reviews afterwards
    status, answer = await _post(url, ctx, json.dumps(_review("deployment_pod")).encode())
    assert status == 200 and answer["response"]["allowed"] is True


async def test_ready_and_stats(webhook: Any) -> None:
    _, url, ctx = webhook
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        async with s.get(url + "/ready", ssl=ctx) as r:
            assert r.status == 200
        await _post(url, ctx, json.dumps(_review("deployment_pod")).encode())
        async with s.get(url + "/stats", ssl=ctx) as r:
            stats = await r.json()
    assert stats["injected"] == 1 and stats["reasons"] == {"injected": 1}


async def test_plain_http_is_refused_by_tls_server(webhook: Any) -> None:
    _, url, _ = webhook
    with pytest.raises(aiohttp.ClientError):
        async with aiohttp.ClientSession(timeout=TIMEOUT) as s, s.post(
                url.replace("https", "http") + "/inject", data=b"{}") as r:
            await r.read()


async def test_entrypoint_process(tmp_path: Path) -> None:
    """The command the chart runs: python -m diktyo.control.inject.webhook --cert --key ..."""
    import asyncio
    import re
    import signal
    import sys

    certs = webhook_certs("diktyo", "diktyo-system", ips=("127.0.0.1",))
    (tmp_path / "tls.crt").write_bytes(certs.cert_pem)
    (tmp_path / "tls.key").write_bytes(certs.key_pem)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "diktyo.control.inject.webhook", "--cert", str(tmp_path / "tls.crt"),
        "--key", str(tmp_path / "tls.key"), "--host", "127.0.0.1", "--port", "0",
        "--image", "registry.example.com/diktyo:9", "--control-plane", "http://cp.mesh.svc:15010",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), timeout=20)).decode()
        m = re.search(r"https://127\.0\.0\.1:(\d+)/inject", line)
        assert m, line
        ctx = ssl.create_default_context(cadata=certs.ca_pem.decode())
        status, answer = await _post(f"https://127.0.0.1:{m.group(1)}", ctx,
                                     json.dumps(_review("deployment_pod")).encode())
        assert status == 200
        ops = json.loads(base64.b64decode(answer["response"]["patch"]))
        proxy = next(op["value"] for op in ops if op["path"] == "/spec/containers/-")
        assert proxy["image"] == "registry.example.com/diktyo:9"
        env = {e["name"]: e.get("value") for e in proxy["env"]}
        assert env["DIKTYO_CONTROL_PLANE"] == "http://cp.mesh.svc:15010"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), timeout=10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_entrypoint_needs_both_cert_and_key() -> None:
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "diktyo.control.inject.webhook", "--cert", "x.pem"],
                         capture_output=True, text=True, timeout=30, check=False)
    assert res.returncode == 2 and "both --cert and --key" in res.stderr
    res = subprocess.run([sys.executable, "-m", "diktyo.control.inject.webhook", "--cert", "/nonexistent/tls.crt",
                          "--key", "/nonexistent/tls.key", "--port", "0"],
                         capture_output=True, text=True, timeout=30, check=False)
    assert res.returncode == 1 and "cannot load the TLS certificate" in res.stderr, res.stderr
