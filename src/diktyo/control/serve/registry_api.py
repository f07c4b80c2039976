"""The registry API: services, workload instances and proxies joining and leaving
(``/v1/registry/...``), the platform's workload list (``/v1/workloads``) and bootstrap tokens
(``POST /v1/tokens``).

A sidecar's bootstrap token is good only for its own workload: it may register an instance
or a proxy of its namespace and service account, nothing else (``ControlPlane.may_act_for``).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import msgspec
from aiohttp import web

from diktyo.api.limits import ParseLimitError, check_json, decode_json
from diktyo.control.model import ProxyNode, Service, WorkloadInstance
from diktyo.control.serve.http import decode, dumps, error, limit_error

if TYPE_CHECKING:
    from diktyo.control.server import ControlPlane


class RegistryApi:
    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/v1/registry", self._h_registry),
            web.post("/v1/registry/services", self._h_add_service),
            web.delete("/v1/registry/services/{hostname}", self._h_del_service),
            web.post("/v1/registry/instances", self._h_add_instance),
            web.delete("/v1/registry/instances/{name}", self._h_del_instance),
            web.post("/v1/registry/proxies", self._h_add_proxy),
            web.delete("/v1/registry/proxies/{node}", self._h_del_proxy),
            web.get("/v1/workloads", self._h_workloads),
            web.post("/v1/tokens", self._h_token),
        ]

    async def _h_registry(self, request: web.Request) -> web.Response:
        reg = self.cp.registry
        return web.json_response(
            {
                "services": msgspec.to_builtins(list(reg.services.values())),
                "instances": msgspec.to_builtins(list(reg.instances.values())),
                "proxies": msgspec.to_builtins(list(self.cp.proxies.values())),
            },
            dumps=dumps,
        )

    async def _h_add_service(self, request: web.Request) -> web.Response:
        svc = await decode(request, Service)
        if isinstance(svc, web.Response):
            return svc
        self.cp.registry.add_service(svc)
        return web.json_response({"ok": True})

    async def _h_del_service(self, request: web.Request) -> web.Response:
        ok = self.cp.registry.remove_service(request.match_info["hostname"])
        return web.json_response({"ok": ok}, status=200 if ok else 404)

    async def _h_add_instance(self, request: web.Request) -> web.Response:
        raw = await request.read()
        try:
            check_json(raw)
            data = json.loads(raw)
            admin_url = data.pop("admin_url", None)
            inst = msgspec.convert(data, WorkloadInstance, strict=False)
        except ParseLimitError as exc:
            return limit_error(exc)
        except (ValueError, msgspec.ValidationError, AttributeError, TypeError) as exc:
            return error(400, f"bad instance: {exc}")
        if not self.cp.may_act_for(request, inst.namespace, inst.service_account):
            return self.cp.forbidden(request, f"instance {inst.name!r}")
        self.cp.registry.add_instance(inst, admin_url)
        return web.json_response({"ok": True})

    async def _h_del_instance(self, request: web.Request) -> web.Response:
        ok = self.cp.registry.remove_instance(request.match_info["name"])
        return web.json_response({"ok": ok}, status=200 if ok else 404)

    async def _h_add_proxy(self, request: web.Request) -> web.Response:
        cp = self.cp
        proxy = await decode(request, ProxyNode)
        if isinstance(proxy, web.Response):
            return proxy
        if not cp.may_act_for(request, proxy.node.namespace, proxy.node.service_account):
            return cp.forbidden(request, f"node {proxy.node.id!r}")
        known = cp.proxies.get(proxy.node.id)
        if known is not None and not cp.may_act_for(
            request, known.node.namespace, known.node.service_account
        ):
            return cp.forbidden(request, f"node {proxy.node.id!r}")
        cp.add_proxy(proxy)
        return web.json_response({"ok": True, "node": proxy.node.id})

    async def _h_del_proxy(self, request: web.Request) -> web.Response:
        ok = self.cp.remove_proxy(request.match_info["node"])
        return web.json_response({"ok": ok}, status=200 if ok else 404)

    async def _h_workloads(self, request: web.Request) -> web.Response:
        provider = self.cp.workloads_provider
        return web.json_response({"workloads": provider() if provider else []})

    async def _h_token(self, request: web.Request) -> web.Response:
        """Admin: a bootstrap token for ``{"namespace", "service_account", "ttl"?}`` (a sidecar
        started by hand passes it with ``--token-file``)."""
        identity = self.cp.identity
        try:
            body = decode_json(await request.read())
            ns = str(body.get("namespace") or "default")
            sa = str(body.get("service_account") or "default")
            ttl = float(body.get("ttl") or 3600.0)
            token = identity.token_for(ns, sa, ttl)
        except ParseLimitError as exc:
            return limit_error(exc)
        except (ValueError, TypeError, AttributeError) as exc:
            return error(400, f'body must be {{"namespace": NS, "service_account": SA}}: {exc}')
        return web.json_response({"token": token, "spiffe_id": identity.spiffe_id(ns, sa)})
