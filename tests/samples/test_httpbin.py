"""The httpbin-like sample as a real process: echo endpoints, status codes, delays, bytes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import aiohttp
import pytest
from sample_helpers import StartApp

from diktyo.core.clock import make_random
from diktyo.samples.httpbin import pick_status, title_case
from diktyo.testing import eventually_sync

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def httpbin(start_module_app: StartApp) -> str:
    return start_module_app("httpbin").url


async def fetch(method: str, url: str, **kwargs: object) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as session, session.request(method, url, **kwargs) as resp:  # type: ignore[arg-type]
        return resp.status, dict(resp.headers), await resp.read()


async def test_get_echoes_args_and_title_cased_headers(httpbin: str) -> None:
    status, _, body = await fetch(
        "GET", httpbin + "/get?a=1&b=2&b=3", headers={"x-request-id": "r1"}
    )
    data = json.loads(body)
    assert status == 200
    assert data["args"] == {"a": "1", "b": ["2", "3"]}
    assert data["headers"]["X-Request-Id"] == "r1"
    assert data["origin"] == "127.0.0.1"
    assert data["url"].endswith("/get?a=1&b=2&b=3")


async def test_headers_ip_user_agent(httpbin: str) -> None:
    _, _, body = await fetch("GET", httpbin + "/headers", headers={"end-user": "jason"})
    assert json.loads(body)["headers"]["End-User"] == "jason"
    _, _, body = await fetch(
        "GET", httpbin + "/ip", headers={"x-forwarded-for": "10.1.2.3, 1.1.1.1"}
    )
    assert json.loads(body) == {"origin": "10.1.2.3"}
    _, _, body = await fetch("GET", httpbin + "/user-agent", headers={"user-agent": "fortio"})
    assert json.loads(body) == {"user-agent": "fortio"}


@pytest.mark.parametrize("code", [200, 201, 204, 418, 500, 503])
async def test_status(httpbin: str, code: int) -> None:
    status, _, _ = await fetch("GET", httpbin + f"/status/{code}")
    assert status == code
    status, _, _ = await fetch("POST", httpbin + f"/status/{code}", data=b"x")
    assert status == code


async def test_status_mixed_and_invalid(httpbin: str) -> None:
    codes = Counter([(await fetch("GET", httpbin + "/status/200,503"))[0] for _ in range(40)])
    assert set(codes) == {200, 503} and sum(codes.values()) == 40
    assert (await fetch("GET", httpbin + "/status/abc"))[0] == 400
    assert (await fetch("GET", httpbin + "/status/999"))[0] == 400


async def test_delay_waits_and_is_capped(httpbin: str) -> None:
    start = time.monotonic()
    status, _, body = await fetch("GET", httpbin + "/delay/0.3?x=1")
    assert status == 200 and json.loads(body)["args"] == {"x": "1"}
    assert time.monotonic() - start >= 0.3
    assert (await fetch("GET", httpbin + "/delay/soon"))[0] == 400


async def test_anything_echoes_method_and_body(httpbin: str) -> None:
    status, _, body = await fetch("PUT", httpbin + "/anything/a/b?q=1", json={"k": [1, 2]})
    data = json.loads(body)
    assert status == 200
    assert data["method"] == "PUT" and data["json"] == {"k": [1, 2]} and data["args"] == {"q": "1"}
    assert data["url"].endswith("/anything/a/b?q=1")
    _, _, body = await fetch("POST", httpbin + "/post", data={"user": "jason"})
    assert json.loads(body)["form"] == {"user": "jason"}


async def test_bytes(httpbin: str) -> None:
    status, headers, body = await fetch("GET", httpbin + "/bytes/1000")
    assert status == 200 and len(body) == 1000
    assert headers["Content-Type"] == "application/octet-stream"
    _, _, one = await fetch("GET", httpbin + "/bytes/64?seed=7")
    _, _, two = await fetch("GET", httpbin + "/bytes/64?seed=7")
    assert one == two and len(one) == 64
    _, _, big = await fetch("GET", httpbin + "/bytes/10000000")
    assert len(big) == 100 * 1024


def test_pick_status() -> None:
    rng = make_random(1)
    assert pick_status("503", rng) == 503
    picks = Counter(pick_status("200:0.9,503:0.1", rng) for _ in range(1000))
    assert set(picks) == {200, 503} and picks[200] > picks[503] * 3
    assert {pick_status("200:0,503", rng) for _ in range(50)} == {503}
    for bad in ("", "abc", "99", "200:x", "200:0,503:0"):
        with pytest.raises(ValueError):
            pick_status(bad, rng)


def test_title_case() -> None:
    assert title_case("x-b3-traceid") == "X-B3-Traceid"
    assert title_case("HOST") == "Host"


def test_sleep_idles_and_stops_on_sigterm(tmp_path: Path) -> None:
    log = tmp_path / "sleep.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "diktyo.samples.sleep"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "POD_NAME": "sleep-1", "HTTP_PROXY": "http://127.0.0.1:1"},
        )
    try:

        def idle() -> bool:
            assert proc.poll() is None, log.read_text()
            return "idle" in log.read_text()

        eventually_sync(idle, timeout=30, what="sleep-1's idle line")
        assert (
            "sleep-1 idle (no port); outgoing calls go through http://127.0.0.1:1"
            in log.read_text()
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
