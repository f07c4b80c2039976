"""The control plane's API refuses anonymous, cross-site and foreign-identity requests (issue 12)."""

from __future__ import annotations

import asyncio
import os
import stat
import sys
from pathlib import Path

import aiohttp
import msgspec

from diktyo.control.model import ProxyNode, WorkloadInstance
from diktyo.control.server import ControlPlane
from diktyo.dashboard import mount as mount_dashboard
from diktyo.security import admin_token
from diktyo.snapshot.model import Node
from diktyo.testing.controlplane import JSON, YAML, admin_headers

VS = (
    "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: hello}\n"
    "spec:\n  hosts: [hello]\n  http:\n  - route:\n    - destination: {host: hello}\n"
)
REVIEWS = ProxyNode(
    node=Node(id="reviews-1.default", workload="reviews", service_account="bookinfo-reviews")
)
RATINGS = ProxyNode(
    node=Node(id="ratings-1.default", workload="ratings", service_account="bookinfo-ratings")
)


def _instance(name: str, sa: str) -> bytes:
    inst = WorkloadInstance(
        name=name, workload=name, address="127.0.0.1", ports={9080: 1}, services=("x",),
        service_account=sa,
    )  # fmt: skip
    return msgspec.json.encode(inst)


async def test_no_credential_no_change() -> None:
    cp = ControlPlane(observability=False, admin_token_file="/home/u/.diktyo/admin-token")
    await cp.start()
    try:
        async with aiohttp.ClientSession() as s:
            calls = [
                ("POST", "/v1/config", VS.encode(), YAML),
                ("POST", "/v1/registry/instances", _instance("evil", "default"), JSON),
                ("POST", "/v1/registry/proxies", msgspec.json.encode(REVIEWS), JSON),
                ("GET", "/v1/registry", None, {}),
                ("GET", "/v1/config", None, {}),
                ("GET", "/v1/proxies", None, {}),
                ("DELETE", "/v1/config/VirtualService/default/hello", None, {}),
                ("POST", "/v1/tokens", b'{"namespace": "default"}', JSON),
                ("GET", "/", None, {}),
            ]
            for method, path, body, headers in calls:
                async with s.request(method, cp.url + path, data=body, headers=headers) as r:
                    answer = await r.json()
                    assert r.status == 401, (path, answer)
                    assert "/home/u/.diktyo/admin-token" in answer["error"], answer
                    assert r.headers["WWW-Authenticate"].startswith("Bearer")
            # a wrong token is no better
            bad = {"Authorization": "Bearer nope", **YAML}
            async with s.post(cp.url + "/v1/config", data=VS, headers=bad) as r:
                assert r.status == 401
            async with s.get(cp.url + "/healthz") as r:
                assert r.status == 200  # liveness stays open
        assert cp.store.resources == () and cp.registry.instances == {} and cp.proxies == {}
        async with (
            aiohttp.ClientSession(headers=admin_headers(cp)) as s,
            s.post(cp.url + "/v1/config", data=VS, headers=YAML) as r,
        ):
            assert r.status == 200
        assert [r.name for r in cp.store.resources] == ["hello"]
    finally:
        await cp.stop()


async def test_browser_attacks_are_refused_even_with_the_credential() -> None:
    cp = ControlPlane(observability=False)
    await cp.start()
    port = cp.url.rsplit(":", 1)[1]
    try:
        async with aiohttp.ClientSession(headers=admin_headers(cp)) as s:
            # a page on another origin (its fetch would carry the dashboard's cookie)
            for origin in ("http://evil.example", f"http://127.0.0.1:{int(port) + 1}", "null"):
                h = {"Origin": origin, **YAML}
                async with s.post(cp.url + "/v1/config", data=VS, headers=h) as r:
                    assert r.status == 403, origin
            async with s.get(cp.url + "/v1/config", headers={"Sec-Fetch-Site": "cross-site"}) as r:
                assert r.status == 403
            # a "simple" cross-site POST needs no CORS preflight: such types are refused
            for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data"):
                h = {"Content-Type": ctype}
                async with s.post(cp.url + "/v1/config", data=VS, headers=h) as r:
                    assert r.status == 415, ctype
            # DNS rebinding: evil.example resolved to 127.0.0.1 sends its own name as Host
            async with s.get(cp.url + "/v1/config", headers={"Host": f"evil.example:{port}"}) as r:
                assert r.status == 403 and "DNS rebinding" in (await r.json())["error"]
            for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}"):
                async with s.get(cp.url + "/v1/config", headers={"Host": host}) as r:
                    assert r.status == 200, host
            same = {"Origin": f"http://localhost:{port}", "Host": f"localhost:{port}", **YAML}
            async with s.post(cp.url + "/v1/config", data=VS, headers=same) as r:
                assert r.status == 200
        assert cp.access.refused["origin"] == 4 and cp.access.refused["content_type"] == 3
    finally:
        await cp.stop()


async def test_dashboard_link_sets_a_cookie_the_page_uses() -> None:
    cp = ControlPlane()
    assert mount_dashboard(cp)  # the dashboard mounts itself on the API app
    await cp.start()
    try:
        jar = aiohttp.CookieJar(unsafe=True)  # cookies for an IP address host
        async with aiohttp.ClientSession(cookie_jar=jar) as s:
            async with s.get(cp.url + "/api/config") as r:
                assert r.status == 401
            async with s.get(cp.url + "/?token=wrong", allow_redirects=False) as r:
                assert r.status == 401
            link = cp.url + f"/?token={cp.admin_token}&window=3600"
            async with s.get(link, allow_redirects=False) as r:
                assert r.status == 302 and r.headers["Location"] == "/?window=3600"
                cookie = r.headers["Set-Cookie"]
                assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
            async with s.get(cp.url + "/") as r:
                assert r.status == 200 and "<html" in (await r.text()).lower()
            async with s.get(cp.url + "/api/config") as r:
                assert r.status == 200  # the page's own API calls carry the cookie
    finally:
        await cp.stop()


async def test_sidecars_get_only_their_own_snapshot_and_register_only_themselves() -> None:
    cp = ControlPlane(observability=False, poll_timeout=0.5)
    await cp.start()
    cp.add_proxy(REVIEWS)
    cp.add_proxy(RATINGS)
    reviews = {"Authorization": f"Bearer {cp.sidecar_token(REVIEWS)}"}
    try:
        async with aiohttp.ClientSession(headers=reviews) as s:

            async def poll(node: str) -> aiohttp.ClientResponse:
                params = {"node": node, "version": ""}
                async with s.get(cp.url + "/v1/snapshot", params=params) as r:
                    await r.read()
                    return r

            r = await poll(REVIEWS.node.id)
            assert r.status == 200 and r.headers["x-diktyo-token"].startswith("v1.")
            r = await poll(RATINGS.node.id)
            assert r.status == 403
            ack = {"node": RATINGS.node.id, "version": "x", "ok": False, "error": "forged"}
            async with s.post(cp.url + "/v1/ack", json=ack) as r:
                assert r.status == 403
            assert cp.status[RATINGS.node.id].nacked == ""
            # registering: its own workload yes, another identity's no
            own = _instance("reviews-1", "bookinfo-reviews")
            other = _instance("ratings-evil", "bookinfo-ratings")
            async with s.post(cp.url + "/v1/registry/instances", data=own, headers=JSON) as r:
                assert r.status == 200
            async with s.post(cp.url + "/v1/registry/instances", data=other, headers=JSON) as r:
                assert r.status == 403
            hijack = msgspec.json.encode(
                ProxyNode(
                    node=Node(id=RATINGS.node.id, workload="x", service_account="bookinfo-reviews")
                )
            )
            async with s.post(cp.url + "/v1/registry/proxies", data=hijack, headers=JSON) as r:
                assert r.status == 403  # that node id belongs to another identity
            # a sidecar token is not an admin credential
            async with s.get(cp.url + "/v1/registry") as r:
                assert r.status == 401
        assert sorted(cp.registry.instances) == ["reviews-1"]
        assert cp.proxies[RATINGS.node.id].node.service_account == "bookinfo-ratings"
        # a token from another control plane (another key) proves nothing
        other_cp = ControlPlane(observability=False)
        forged = {"Authorization": f"Bearer {other_cp.sidecar_token(REVIEWS)}"}
        async with aiohttp.ClientSession(headers=forged) as s:
            params = {"node": REVIEWS.node.id, "version": ""}
            async with s.get(cp.url + "/v1/snapshot", params=params) as r:
                assert r.status == 401
    finally:
        await cp.stop()


def test_admin_token_file_is_created_private(tmp_path: Path) -> None:
    home = tmp_path / "home"
    token = admin_token.ensure(home)
    path = home / "admin-token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(token) >= 40 and admin_token.ensure(home) == token  # kept, not replaced
    os.chmod(path, 0o644)
    assert admin_token.ensure(home) == token
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


async def test_cli_without_the_token_gets_401_naming_the_file(tmp_path: Path) -> None:
    cp = ControlPlane(observability=False, admin_token_file=tmp_path / "admin-token")
    await cp.start()
    (tmp_path / "vs.yaml").write_text(VS)
    try:
        env = {**os.environ, "DIKTYO_HOME": str(tmp_path)}  # no admin-token there
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "diktyo.cli.main", "apply", "-f", str(tmp_path / "vs.yaml"),
            "--control-plane", cp.url, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 1
        assert str(tmp_path / "admin-token") in err.decode()
        assert cp.store.resources == ()
    finally:
        await cp.stop()


async def test_sidecar_auth_off_opens_only_snapshots_and_acks() -> None:
    """``--sidecar-auth none`` (the Helm chart): snapshots/ACKs without a token, nothing else."""
    cp = ControlPlane(observability=False, poll_timeout=0.5, sidecar_auth=False)
    await cp.start()
    cp.add_proxy(REVIEWS)
    try:
        async with aiohttp.ClientSession() as s:
            params = {"node": REVIEWS.node.id, "version": ""}
            async with s.get(cp.url + "/v1/snapshot", params=params) as r:
                assert r.status == 200 and "x-diktyo-token" not in r.headers
            own = _instance("reviews-1", "bookinfo-reviews")
            async with s.post(cp.url + "/v1/registry/instances", data=own, headers=JSON) as r:
                assert r.status == 401  # the registry still needs a credential
            async with s.post(cp.url + "/v1/config", data=VS, headers=YAML) as r:
                assert r.status == 401
    finally:
        await cp.stop()


async def test_listening_on_every_address_checks_host_only_when_names_are_given() -> None:
    cp = ControlPlane(observability=False)
    await cp.start(host="0.0.0.0")
    port = cp.url.rsplit(":", 1)[1]
    url = f"http://127.0.0.1:{port}"
    named = ControlPlane(observability=False, allowed_hosts=("diktyo.diktyo-system.svc",))
    await named.start(host="0.0.0.0")
    nport = named.url.rsplit(":", 1)[1]
    nurl = f"http://127.0.0.1:{nport}"
    try:
        async with aiohttp.ClientSession() as s:
            h = {"Host": f"diktyo.diktyo-system.svc:{port}", **admin_headers(cp)}
            async with s.get(url + "/v1/config", headers=h) as r:
                assert r.status == 200  # a pod's clients use names it cannot know
            h = {"Host": f"evil.example:{nport}", **admin_headers(named)}
            async with s.get(nurl + "/v1/config", headers=h) as r:
                assert r.status == 403
            h = {"Host": f"diktyo.diktyo-system.svc:{nport}", **admin_headers(named)}
            async with s.get(nurl + "/v1/config", headers=h) as r:
                assert r.status == 200
    finally:
        await cp.stop()
        await named.stop()
