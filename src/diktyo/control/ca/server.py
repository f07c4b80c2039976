"""aiohttp routes for the CA: mount ``ca_routes(service)`` on the control plane's app."""

from __future__ import annotations

import json
from typing import Any

from diktyo.api.limits import ParseLimitError, check_json
from diktyo.control.ca.service import CaService

MAX_BODY = 64 * 1024


def ca_routes(service: CaService) -> list[Any]:
    """``[POST /v1/certificates]`` as aiohttp route definitions (``app.add_routes(...)``)."""
    from aiohttp import web

    async def certificates(request: web.Request) -> web.Response:
        if request.content_length is not None and request.content_length > MAX_BODY:
            return web.json_response({"error": "request too large"}, status=413)
        raw = await request.content.read(MAX_BODY + 1)
        if len(raw) > MAX_BODY:
            return web.json_response({"error": "request too large"}, status=413)
        try:
            check_json(raw)
            body = json.loads(raw)
        except ParseLimitError as exc:
            return web.json_response({"error": f"request body: {exc}"}, status=400)
        except ValueError:
            return web.json_response({"error": "request body is not JSON"}, status=400)
        status, out = await service.handle_async(body, request.headers.get("Authorization"))
        return web.json_response(out, status=status)

    return [web.post("/v1/certificates", certificates)]
