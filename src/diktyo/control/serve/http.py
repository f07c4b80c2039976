"""Small HTTP helpers every part of the control plane's API shares: JSON errors, body decoding."""

from __future__ import annotations

import json
from typing import Any, TypeVar

import msgspec
from aiohttp import web

from diktyo.api.limits import ParseLimitError, decode_json

T = TypeVar("T")


def error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def limit_error(exc: ParseLimitError) -> web.Response:
    """400 for a body that breaks a parsing limit: position, limit, hint."""
    return web.json_response(
        {
            "error": f"<request body>:{exc.line}:{exc.col}: {exc.message}",
            "limit": exc.limit,
            "hint": exc.hint,
        },
        status=400,
    )


async def decode(request: web.Request, typ: type[T]) -> T | web.Response:
    """The body of ``request`` as a ``typ``, or the 400 answer."""
    raw = await request.read()
    try:
        value: T = decode_json(raw, typ)
    except ParseLimitError as exc:
        return limit_error(exc)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        return error(400, f"bad {typ.__name__}: {exc}")
    return value


def dumps(obj: Any) -> str:
    return json.dumps(obj, default=str)
