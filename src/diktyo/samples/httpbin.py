"""An httpbin-like service: echoes requests as JSON, answers chosen status codes and delays.

Endpoints (JSON shaped like httpbin.org's): ``/get``, ``/post``, ``/headers``, ``/ip``,
``/user-agent``, ``/anything[/<path>]`` (any method), ``/status/<codes>`` (any method; one code,
or a comma-separated choice picked at random, optionally weighted as ``200:0.9,503:0.1``),
``/delay/<seconds>`` (capped at 10 s), ``/bytes/<n>`` (n random bytes, at most 100 KiB;
``?seed=N`` makes them repeatable), ``/health``. Listens on ``PORT`` (default 8000).
Used by Istio's circuit breaking, fault injection and egress tasks.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
from typing import Any

from aiohttp import web

from diktyo.core.clock import make_random
from diktyo.samples.runtime import Settings, new_app, run

MAX_DELAY_SECONDS = 10.0
MAX_BYTES = 100 * 1024
ANY_METHOD = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")


def title_case(name: str) -> str:
    """``x-request-id`` -> ``X-Request-Id``, the way httpbin shows header names."""
    return "-".join(part[:1].upper() + part[1:].lower() for part in name.split("-"))


def header_dict(request: web.BaseRequest) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in request.headers.items():
        key = title_case(name)
        out[key] = f"{out[key]},{value}" if key in out else value
    return out


def origin(request: web.BaseRequest) -> str:
    forwarded = request.headers.get("x-forwarded-for")
    return forwarded.split(",")[0].strip() if forwarded else (request.remote or "")


def args_dict(request: web.BaseRequest) -> dict[str, str | list[str]]:
    out: dict[str, str | list[str]] = {}
    for key in request.query:
        values = request.query.getall(key)
        out[key] = values[0] if len(values) == 1 else list(values)
    return out


def echo(request: web.BaseRequest) -> dict[str, Any]:
    return {
        "args": args_dict(request),
        "headers": header_dict(request),
        "origin": origin(request),
        "url": str(request.url),
    }


async def echo_with_body(request: web.Request) -> dict[str, Any]:
    body = await request.read()
    data = body.decode("utf-8", "replace")
    form: dict[str, str] = {}
    parsed: Any = None
    if request.content_type == "application/x-www-form-urlencoded":
        form = {k: str(v) for k, v in (await request.post()).items()}
        data = ""
    elif request.content_type == "application/json":
        try:
            parsed = json.loads(body or b"null")
        except ValueError:
            parsed = None
    out = echo(request)
    out.update({"method": request.method, "data": data, "form": form, "json": parsed, "files": {}})
    return out


def pick_status(spec: str, rng: random.Random) -> int:
    """``"503"`` -> 503; ``"200,503"`` -> either; ``"200:0.9,503:0.1"`` -> weighted choice.

    Raises ValueError for anything else.
    """
    codes: list[int] = []
    weights: list[float] = []
    for part in spec.split(","):
        code_text, _, weight_text = part.partition(":")
        code = int(code_text)
        if not 100 <= code <= 599:
            raise ValueError(f"status code out of range: {code}")
        codes.append(code)
        weights.append(float(weight_text) if weight_text else 1.0)
    if len(codes) == 1:
        return codes[0]
    if sum(weights) <= 0:
        raise ValueError("weights must add up to more than 0")
    return rng.choices(codes, weights)[0]


def make_app(settings: Settings) -> web.Application:
    app = new_app(settings)
    rng = make_random()

    async def get(request: web.Request) -> web.Response:
        return web.json_response(echo(request))

    async def with_body(request: web.Request) -> web.Response:
        return web.json_response(await echo_with_body(request))

    async def headers(request: web.Request) -> web.Response:
        return web.json_response({"headers": header_dict(request)})

    async def ip(request: web.Request) -> web.Response:
        return web.json_response({"origin": origin(request)})

    async def user_agent(request: web.Request) -> web.Response:
        return web.json_response({"user-agent": request.headers.get("user-agent")})

    async def status(request: web.Request) -> web.Response:
        try:
            code = pick_status(request.match_info["codes"], rng)
        except ValueError:
            return web.json_response(
                {
                    "error": "invalid status code; use /status/503, /status/200,503 "
                    "or /status/200:0.9,503:0.1"
                },
                status=400,
            )
        if code in (204, 304) or code < 200:
            return web.Response(status=code)
        return web.Response(status=code, text="", content_type="text/html")

    async def delay(request: web.Request) -> web.Response:
        try:
            seconds = float(request.match_info["seconds"])
        except ValueError:
            return web.json_response({"error": "delay must be a number of seconds"}, status=400)
        await asyncio.sleep(max(0.0, min(seconds, MAX_DELAY_SECONDS)))
        return web.json_response(echo(request))

    async def random_bytes(request: web.Request) -> web.Response:
        try:
            n = int(request.match_info["n"])
            seed = request.query.get("seed")
            source = make_random(int(seed)) if seed is not None else rng
        except ValueError:
            return web.json_response({"error": "n and seed must be integers"}, status=400)
        n = max(0, min(n, MAX_BYTES))
        return web.Response(body=source.randbytes(n), content_type="application/octet-stream")

    app.router.add_get("/get", get)
    app.router.add_post("/post", with_body)
    app.router.add_put("/put", with_body)
    app.router.add_patch("/patch", with_body)
    app.router.add_delete("/delete", with_body)
    app.router.add_get("/headers", headers)
    app.router.add_get("/ip", ip)
    app.router.add_get("/user-agent", user_agent)
    app.router.add_get("/delay/{seconds}", delay)
    app.router.add_get("/bytes/{n}", random_bytes)
    for method in ANY_METHOD:
        if method != "HEAD":
            app.router.add_route(method, "/anything", with_body)
            app.router.add_route(method, "/anything/{path:.*}", with_body)
        app.router.add_route(method, "/status/{codes}", status)
    return app


def main() -> int:
    return run(make_app, service="httpbin", default_port=8000)


if __name__ == "__main__":
    sys.exit(main())
