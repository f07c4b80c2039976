"""A small stand-in for the Kubernetes API server (tests only): list and watch over real HTTP.

There is no cluster on diktyo's build machines. ``FakeApiServer`` serves recorded API objects
the way the API server does for the requests ``KubeWatcher`` makes: ``GET <path>`` lists
(``{"kind": "<Kind>List", "metadata": {"resourceVersion": ...}, "items": [...]}``, items
without kind/apiVersion), ``GET <path>?watch=1&resourceVersion=N`` streams newline-separated
watch events after N (replaying what happened since), bearer-token checks (401), 404 for a
resource whose CRD is "not installed", over HTTP or HTTPS. It is a stand-in: admission,
field selectors, pagination and real RBAC are not modelled.
"""

from __future__ import annotations

import asyncio
import copy
import json
import ssl
from typing import Any

from aiohttp import web


def projected_token(
    user: str, audiences: tuple[str, ...], name: str = "", exp: float | None = None
) -> str:
    """A JWT shaped like a projected service-account token: header ``{"alg": "RS256"}``,
    payload with ``sub``, ``aud``, ``exp`` (an hour from now unless given) and ``name`` as
    ``jti`` (so tokens for one user differ). The signature is made up: as with the real API
    server, the TokenReview is what decides."""
    import base64
    import time

    def part(obj: Any) -> str:
        raw = json.dumps(obj, separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    payload = {
        "iss": "https://kubernetes.default.svc.cluster.local",
        "sub": user,
        "aud": list(audiences),
        "exp": int(time.time() + 3600 if exp is None else exp),
        "jti": name,
    }
    return f"{part({'alg': 'RS256', 'kid': 'fake'})}.{part(payload)}.c2lnbmF0dXJl"


class FakeApiServer:
    def __init__(self, token: str = "t0ken", tls: ssl.SSLContext | None = None) -> None:
        self.token = token
        self.tls = tls
        self.rv = 1000
        self.kinds: dict[str, tuple[str, str]] = {}  # path -> (apiVersion, kind)
        self.objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = {}
        self.events: list[tuple[int, str, dict[str, Any]]] = []  # (rv, path, event)
        self.missing: set[str] = set()
        # TokenReview: bearer token -> (username, audiences it was issued for)
        self.tokens: dict[str, tuple[str, tuple[str, ...]]] = {}
        self.reviews: list[dict[str, Any]] = []
        self.requests: list[tuple[str, dict[str, str], str]] = []
        self._changed = asyncio.Condition()
        self._closing = False
        self._epoch = 0  # end_watches() bumps it: open watches end, as at their timeoutSeconds
        self.runner: web.AppRunner | None = None
        self.url = ""

    # ------------------------------------------------------------------ content
    def add_resource(self, path: str, api_version: str, kind: str, installed: bool = True) -> None:
        self.kinds[path] = (api_version, kind)
        self.objects.setdefault(path, {})
        if not installed:
            self.missing.add(path)

    def install(self, path: str) -> None:
        """The CRD behind ``path`` gets installed: it is served from now on."""
        self.missing.discard(path)

    async def put(self, path: str, obj: dict[str, Any]) -> None:
        """Create or replace an object (an ADDED or MODIFIED event for watchers)."""
        meta = obj.setdefault("metadata", {})
        key = (str(meta.get("namespace", "")), str(meta["name"]))
        event = "MODIFIED" if key in self.objects[path] else "ADDED"
        self.rv += 1
        meta["resourceVersion"] = str(self.rv)
        api_version, kind = self.kinds[path]
        full = {"apiVersion": api_version, "kind": kind, **copy.deepcopy(obj)}
        self.objects[path][key] = full
        await self._event(path, {"type": event, "object": full})

    async def delete(self, path: str, namespace: str, name: str) -> None:
        obj = self.objects[path].pop((namespace, name))
        self.rv += 1
        obj = {**obj, "metadata": {**obj["metadata"], "resourceVersion": str(self.rv)}}
        await self._event(path, {"type": "DELETED", "object": obj})

    async def end_watches(self) -> None:
        """End every open watch (the API server does at ``timeoutSeconds``): clients watch again."""
        self._epoch += 1
        async with self._changed:
            self._changed.notify_all()

    async def _event(self, path: str, event: dict[str, Any]) -> None:
        self.events.append((self.rv, path, event))
        async with self._changed:
            self._changed.notify_all()

    # ------------------------------------------------------------------ serving
    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/apis/authentication.k8s.io/v1/tokenreviews", self._review)
        app.router.add_get("/api/{version}/{plural}", self._handle)
        app.router.add_get("/apis/{group}/{version}/{plural}", self._handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=self.tls)
        await site.start()
        port = int(self.runner.addresses[0][1])
        self.url = f"{'https' if self.tls else 'http'}://127.0.0.1:{port}"
        return self.url

    async def close(self) -> None:
        self._closing = True
        async with self._changed:
            self._changed.notify_all()
        if self.runner is not None:
            await self.runner.cleanup()

    def issue(self, user: str, audiences: tuple[str, ...], name: str = "") -> str:
        """A token this API server's TokenReview knows (``user``, ``audiences``), shaped like a
        kubelet's projected service-account token (``projected_token``)."""
        token = projected_token(user, audiences, name)
        self.tokens[token] = (user, audiences)
        return token

    def _status(self, code: int, reason: str, message: str) -> web.Response:
        return web.json_response({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                  "message": message, "reason": reason, "code": code}, status=code)

    async def _review(self, request: web.Request) -> web.Response:
        """TokenReview (authentication.k8s.io/v1), as the API server answers it."""
        if request.headers.get("Authorization", "") != f"Bearer {self.token}":
            return self._status(401, "Unauthorized", "Unauthorized")
        review = await request.json()
        self.reviews.append(review)
        spec = review.get("spec") or {}
        wanted = tuple(spec.get("audiences") or ())
        known = self.tokens.get(str(spec.get("token", "")))
        status: dict[str, Any]
        if known is None or (wanted and not set(wanted) & set(known[1])):
            status = {"authenticated": False, "error": "[invalid bearer token, token audiences "
                      "don't match]" if known else "[invalid bearer token]"}
        else:
            user, auds = known
            status = {"authenticated": True, "user": {"username": user, "groups": [
                "system:serviceaccounts"]}, "audiences": [a for a in wanted if a in auds] or list(auds)}
        return web.json_response({**review, "status": status}, status=201)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        auth = request.headers.get("Authorization", "")
        self.requests.append((path, dict(request.query), auth))
        if auth != f"Bearer {self.token}":
            return self._status(401, "Unauthorized", "Unauthorized")
        if path not in self.kinds or path in self.missing:
            return self._status(404, "NotFound", "the server could not find the requested resource")
        if "watch" not in request.query:
            api_version, kind = self.kinds[path]
            items = [{k: v for k, v in o.items() if k not in ("kind", "apiVersion")}
                     for _, o in sorted(self.objects[path].items())]
            return web.json_response({"kind": f"{kind}List", "apiVersion": api_version,
                                      "metadata": {"resourceVersion": str(self.rv)},
                                      "items": items})
        since = int(request.query.get("resourceVersion") or 0)
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        epoch = self._epoch
        while not self._closing and path not in self.missing and epoch == self._epoch:
            for rv, p, event in self.events:
                if p == path and rv > since:
                    await resp.write(json.dumps(event).encode() + b"\n")
                    since = rv
            async with self._changed:
                try:
                    await asyncio.wait_for(self._changed.wait(), 1.0)
                except TimeoutError:
                    pass
        return resp
