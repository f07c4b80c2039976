"""Helpers for the sample apps' tests: a tiny recording HTTP server and a refused-port URL."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from diktyo.samples.launch import SampleProcess
from diktyo.testing import free_port

StartApp = Callable[..., SampleProcess]


def closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens (connections are refused)."""
    return f"http://127.0.0.1:{free_port()}"


@dataclass
class Recorded:
    method: str
    host: str
    path: str
    url: str
    headers: CIMultiDict[str]


@dataclass
class Reply:
    status: int = 200
    json: Any = None
    delay: float = 0.0


@dataclass
class Recorder:
    """An HTTP server that records every request and answers from per-path-prefix replies.

    ``replies[prefix]`` is a list: each request takes the next reply, the last one repeats.
    """

    replies: dict[str, list[Reply]] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)
    url: str = ""

    def reply(self, prefix: str, *replies: Reply) -> None:
        self.replies[prefix] = list(replies)

    def to(self, prefix: str) -> list[Recorded]:
        return [r for r in self.requests if r.path.startswith(prefix)]

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append(
            Recorded(
                request.method,
                request.headers.get("Host", ""),
                request.path,
                str(request.url),
                CIMultiDict(request.headers),
            )
        )
        for prefix, queue in self.replies.items():
            if request.path.startswith(prefix):
                reply = queue.pop(0) if len(queue) > 1 else queue[0]
                if reply.delay:
                    await asyncio.sleep(reply.delay)
                return web.json_response(reply.json, status=reply.status)
        return web.json_response({"error": "no reply configured"}, status=404)
