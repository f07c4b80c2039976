"""Auto-registration: a workload that starts with a WorkloadGroup's identity registers its own
WorkloadEntry, reports its health, and its entry goes away a grace period after it does.

Theory of operation
-------------------
A registrant (``diktyo join``'s agent, beside each sidecar it runs) opens a WebSocket to ``GET
/v1/registry/workloadentries`` with its bootstrap token (the sidecar credential of
``control.auth``) and speaks JSON messages:

1. ``{"type": "hello", "group": G, "namespace": NS}`` -> ``{"type": "group", "template": {...},
   "labels": {...}, "probe": {...} | null}``: the WorkloadGroup ``NS/G`` must exist, and the
   token's identity must be allowed to act for it (Istio's ``ensureProxyCanControlEntry``:
   same namespace, and the template's ``serviceAccount`` if it sets one).
2. ``{"type": "register", "address": A, "node": ID, "inbound": {"9080": 15123}, "labels": {},
   "network": "", "locality": ""}`` -> ``{"type": "registered", "name": "<group>-<address>"}``.
   The entry is built from the group as Istio builds it (``workloadEntryFromGroup``): the
   template, the registrant's address, labels template < group metadata < registrant; the
   annotations ``istio.io/autoRegistrationGroup``, ``istio.io/workloadController``,
   ``istio.io/connectedAt`` and, when the group has a probe,
   ``proxy.istio.io/health-checks-enabled: "true"`` (the entry is then no endpoint until its
   first healthy report). Without traffic capture (local mode) a template port that the
   registrant's sidecar has an inbound listener for is replaced by that listener's port.
3. ``{"type": "health", "healthy": bool, "message": "..."}``, sent on each transition, sets
   the entry's ``status.conditions`` ``Healthy``.
4. The control plane sends ``{"type": "token", "token": T}`` after registering and every 10
   minutes: a fresh bootstrap token for the same identity, so a host that stays up can still
   restart its sidecars after its first token expired.

When the WebSocket ends (closed, reset, or no pong to the 5 s heartbeat), the entry is marked
``istio.io/disconnectedAt``; once it has stayed disconnected for the grace period (Istio's
``PILOT_WORKLOAD_ENTRY_GRACE_PERIOD``, default 10 s, read from that variable) the sweep deletes
it. A registrant that reconnects within the grace period keeps its entry. After a control
plane restart, entries nobody reconnected to within the grace period are swept the same way.
Deleting a WorkloadGroup deletes its auto-registered entries and ends their sessions (in Istio
Kubernetes' garbage collector does this through the entries' owner reference).

Entries are ordinary config resources (``kubectl get workloadentries`` in Istio): every write
goes through ``EntryStore``, the one adapter between this module and the config store.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import socket
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from aiohttp import WSMsgType, web

from diktyo.control.auth import ADMIN, PRINCIPAL
from diktyo.control.translate.workload_entries import (
    AUTO_REGISTRATION_GROUP,
    HEALTH_CHECKS_ANNOTATION,
)

if TYPE_CHECKING:
    from diktyo.control.server import ControlPlane

log = logging.getLogger(__name__)

PATH = "/v1/registry/workloadentries"
CONTROLLER = "istio.io/workloadController"
CONNECTED_AT = "istio.io/connectedAt"
DISCONNECTED_AT = "istio.io/disconnectedAt"
GRACE_ENV = "PILOT_WORKLOAD_ENTRY_GRACE_PERIOD"
DEFAULT_GRACE = 10.0
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """A Go duration (``10s``, ``1m30s``, ``500ms``) or plain seconds -> seconds."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    pos, total = 0, 0.0
    for m in _DURATION.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNIT[m.group(2)]
        pos = m.end()
    if pos != len(text) or not text:
        raise ValueError(f"invalid duration {text!r}: use e.g. 10s, 500ms or 1m")
    return total


def grace_from_env() -> float:
    raw = os.environ.get(GRACE_ENV, "")
    if not raw:
        return DEFAULT_GRACE
    try:
        return parse_duration(raw)
    except ValueError as exc:
        log.warning("%s: %s; using the default %gs", GRACE_ENV, exc, DEFAULT_GRACE)
        return DEFAULT_GRACE


def timestamp(t: float) -> str:
    """RFC 3339 with fractional seconds, UTC (the format of Istio's connect annotations)."""
    return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")


def parse_timestamp(text: str) -> float | None:
    try:
        return datetime.fromisoformat(text).timestamp()
    except (ValueError, AttributeError):
        return None


def entry_name(group: str, address: str, network: str = "") -> str:
    """Istio's name of an auto-registered entry: ``<group>-<address>[-<network>]`` (':' of an
    IPv6 address as '-'), cut from the front to 253 characters."""
    parts = [group, address.replace(":", "-")] + ([network] if network else [])
    name = "-".join(parts)
    return name[-253:]


class RegistrationError(Exception):
    """A registration refused; the message goes back to the registrant."""


def _camel(value: Any) -> Any:
    """A spec model as Istio's JSON (camelCase, unset fields left out)."""
    return value.model_dump(by_alias=True, exclude_none=True, exclude_defaults=True)


def build_entry(
    group: Any,
    reg: dict[str, Any],
    *,
    controller: str,
    now: float,
) -> dict[str, Any]:
    """The WorkloadEntry document for registration ``reg`` of WorkloadGroup resource ``group``."""
    spec = group.spec
    template = _camel(spec.template)
    address = str(reg.get("address") or "")
    if not address:
        raise RegistrationError("register: 'address' is required (this host's address)")
    network = str(reg.get("network") or "")
    name = entry_name(group.name, address, network)
    meta = spec.metadata
    labels = {
        **dict(spec.template.labels),
        **(dict(meta.labels) if meta else {}),
        **{str(k): str(v) for k, v in dict(reg.get("labels") or {}).items()},
    }
    inbound = {str(k): int(v) for k, v in dict(reg.get("inbound") or {}).items()}
    ports = {
        port_name: inbound.get(str(port), port) for port_name, port in spec.template.ports.items()
    }
    entry_spec: dict[str, Any] = {**template, "address": address}
    if ports:
        entry_spec["ports"] = ports
    if labels:
        entry_spec["labels"] = labels
    if network:
        entry_spec["network"] = network
    if reg.get("locality"):
        entry_spec["locality"] = str(reg["locality"])
    annotations = {AUTO_REGISTRATION_GROUP: group.name}
    if meta:
        annotations.update(meta.annotations)
    if spec.probe is not None:
        annotations[HEALTH_CHECKS_ANNOTATION] = "true"
    annotations[CONTROLLER] = controller
    annotations[CONNECTED_AT] = timestamp(now)
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": group.namespace,
        "annotations": annotations,
    }
    if labels:
        metadata["labels"] = labels
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "WorkloadEntry",
        "metadata": metadata,
        "spec": entry_spec,
    }


def document_of(res: Any) -> dict[str, Any]:
    """A loaded WorkloadEntry resource back as its document (to change and write again)."""
    metadata: dict[str, Any] = {"name": res.name, "namespace": res.namespace}
    if res.labels:
        metadata["labels"] = dict(res.labels)
    if res.annotations:
        metadata["annotations"] = dict(res.annotations)
    doc: dict[str, Any] = {
        "apiVersion": res.api_version,
        "kind": res.kind,
        "metadata": metadata,
        "spec": _camel(res.spec),
    }
    if res.status:
        doc["status"] = res.status
    return doc


class EntryStore:
    """The adapter between auto-registration and the config store (the only place that writes)."""

    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp

    def get(self, kind: str, namespace: str, name: str) -> Any:
        for res in self.cp.store.resources:
            if res.kind == kind and res.namespace == namespace and res.name == name:
                return res
        return None

    def entries(self) -> list[Any]:
        return [r for r in self.cp.store.resources if getattr(r, "kind", "") == "WorkloadEntry"]

    async def put(self, doc: dict[str, Any]) -> None:
        meta = doc["metadata"]
        source = f"<autoregistration {meta['namespace']}/{meta['name']}>"
        files = [(source, json.dumps(doc))]  # JSON is YAML: the loader reads it as any apply
        prepared = self.cp.store.prepare(files)
        if prepared.errors:
            raise RegistrationError("; ".join(prepared.errors))
        backend = getattr(self.cp, "backend", None)
        if backend is None:
            self.cp.store.commit(prepared.resources)
            return
        try:  # versioned (compare-and-swap) with etcd; StoreUnavailable without quorum
            await backend.commit(prepared.resources, files)
        except Exception as exc:
            raise RegistrationError(
                f"the store refused WorkloadEntry {meta['namespace']}/{meta['name']}: {exc}"
            ) from exc

    async def delete(self, namespace: str, name: str) -> bool:
        key = ("WorkloadEntry", namespace, name)
        backend = getattr(self.cp, "backend", None)
        if backend is not None:
            deleted, _ = await backend.delete([key])
        else:
            deleted, _ = self.cp.store.delete_keys([key])
        return bool(deleted)


@dataclass
class _Conn:
    namespace: str
    group: str
    name: str = ""
    connected_at: float = 0.0
    healthy: bool | None = None


@dataclass
class Stats:
    """Istio's ``auto_registration_*`` counters."""

    success: int = 0
    updates: int = 0
    unregister: int = 0
    deletes: int = 0
    errors: int = 0
    counts: dict[str, int] = field(default_factory=dict)


class AutoRegistrar:
    """The registration endpoint and the sweep that removes entries after the grace period."""

    def __init__(self, cp: ControlPlane, grace_period: float | None = None) -> None:
        self.cp = cp
        self.store = EntryStore(cp)
        self.grace_period = grace_from_env() if grace_period is None else grace_period
        self.heartbeat = 5.0
        self.instance_id = f"{socket.gethostname()}-{os.getpid()}"
        self.stats = Stats()
        self._live: dict[tuple[str, str], int] = {}  # (namespace, entry name) -> connections
        self._sessions: dict[tuple[str, str], set[web.WebSocketResponse]] = {}
        self.token_refresh = 600.0  # seconds between fresh tokens sent to a registrant
        self.token_ttl = 3600.0
        self._lock = asyncio.Lock()
        self._started = 0.0

    @property
    def controller(self) -> str:
        """This replica's id (the store backend's), written as ``istio.io/workloadController``."""
        backend = getattr(self.cp, "backend", None)
        return str(getattr(backend, "replica_id", "") or self.instance_id)

    def _single_replica(self) -> bool:
        backend = getattr(self.cp, "backend", None)
        return backend is None or getattr(backend, "kind", "embedded") == "embedded"

    def routes(self) -> list[web.RouteDef]:
        return [web.get(PATH, self.handle)]

    # ------------------------------------------------------------------ the WebSocket

    async def handle(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(heartbeat=self.heartbeat)
        if not ws.can_prepare(request).ok:
            return web.json_response(
                {"error": f"{PATH} is a WebSocket: connect with an Upgrade request"}, status=400
            )
        await ws.prepare(request)
        conn: _Conn | None = None
        try:
            while not ws.closed:
                try:
                    msg = await ws.receive(timeout=self.token_refresh)
                except TimeoutError:
                    await self._send_token(request, ws, conn)
                    continue
                if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                    break
                if msg.type == WSMsgType.ERROR:
                    break
                if msg.type != WSMsgType.TEXT:
                    continue
                try:
                    body = json.loads(msg.data)
                    if not isinstance(body, dict):
                        raise RegistrationError("messages are JSON objects with a 'type'")
                    conn, reply = await self._on_message(request, conn, body)
                except (RegistrationError, ValueError) as exc:
                    self.stats.errors += 1
                    log.warning("auto-registration refused: %s", exc)
                    await ws.send_json({"type": "error", "error": str(exc)})
                    await ws.close(code=4000, message=str(exc)[:120].encode())
                    break
                if reply is not None:
                    await ws.send_json(reply)
                    if reply.get("type") == "registered" and conn is not None:
                        self._sessions.setdefault((conn.namespace, conn.name), set()).add(ws)
                        await self._send_token(request, ws, conn)
        finally:
            if conn is not None and conn.name:
                self._sessions.get((conn.namespace, conn.name), set()).discard(ws)
                await self._disconnected(conn)
        return ws

    async def _send_token(
        self, request: web.Request, ws: web.WebSocketResponse, conn: _Conn | None
    ) -> None:
        """A fresh bootstrap token for the registrant's identity (as the snapshot long poll
        renews a sidecar's): a host that stays up keeps a token its sidecars can restart with."""
        principal = request.get(PRINCIPAL)
        if conn is None or not conn.name or principal in (None, ADMIN) or ws.closed:
            return
        token = self.cp.identity.tokens.issue(str(principal), self.token_ttl)
        await ws.send_json({"type": "token", "token": token})

    async def _on_message(
        self, request: web.Request, conn: _Conn | None, body: dict[str, Any]
    ) -> tuple[_Conn | None, dict[str, Any] | None]:
        kind = body.get("type")
        if kind == "hello":
            ns = str(body.get("namespace") or "default")
            group_name = str(body.get("group") or "")
            group = self._group(ns, group_name)
            self._check_identity(request, ns, group.spec.template.service_account)
            meta = group.spec.metadata
            return _Conn(ns, group_name), {
                "type": "group",
                "template": _camel(group.spec.template),
                "labels": {
                    **dict(group.spec.template.labels),
                    **(dict(meta.labels) if meta else {}),
                },
                "probe": _camel(group.spec.probe) if group.spec.probe is not None else None,
            }
        if conn is None:
            raise RegistrationError("say hello first: {'type': 'hello', 'group', 'namespace'}")
        if kind == "register":
            if conn.name:
                raise RegistrationError(f"already registered as {conn.namespace}/{conn.name}")
            await self._register(conn, body)
            return conn, {"type": "registered", "name": conn.name, "namespace": conn.namespace}
        if kind == "health":
            if not conn.name:
                raise RegistrationError("register before reporting health")
            await self._health(conn, bool(body.get("healthy")), str(body.get("message") or ""))
            return conn, None
        raise RegistrationError(f"unknown message type {kind!r}: hello, register or health")

    def _group(self, namespace: str, name: str) -> Any:
        group = self.store.get("WorkloadGroup", namespace, name)
        if group is None:
            raise RegistrationError(
                f"cannot find WorkloadGroup {namespace}/{name}: apply it first ('diktyo apply "
                "-f group.yaml'); a workload registers into an existing group"
            )
        return group

    def _check_identity(self, request: web.Request, namespace: str, sa: str | None) -> None:
        principal = request.get(PRINCIPAL)
        if principal == ADMIN:
            return
        want_prefix = f"spiffe://{self.cp.identity.trust_domain}/ns/{namespace}/sa/"
        ok = isinstance(principal, str) and principal.startswith(want_prefix)
        if ok and sa:
            ok = principal == self.cp.identity.spiffe_id(namespace, sa)
        if not ok:
            raise RegistrationError(
                f"{principal or 'anonymous'} may not register into namespace {namespace}"
                + (f" as service account {sa}" if sa else "")
                + ": the bootstrap token must be issued for the WorkloadGroup's namespace and "
                "service account (POST /v1/tokens)"
            )

    async def _register(self, conn: _Conn, reg: dict[str, Any]) -> None:
        group = self._group(conn.namespace, conn.group)
        now = self.cp.clock.time()
        doc = build_entry(group, reg, controller=self.controller, now=now)
        name = doc["metadata"]["name"]
        async with self._lock:
            old = self.store.get("WorkloadEntry", conn.namespace, name)
            if old is not None and AUTO_REGISTRATION_GROUP not in old.annotations:
                raise RegistrationError(
                    f"WorkloadEntry {conn.namespace}/{name} exists and was not auto-registered: "
                    "delete it, or give this host another address"
                )
            if old is not None and old.status:
                doc["status"] = old.status  # a reconnect keeps the last health report
            await self.store.put(doc)
            key = (conn.namespace, name)
            self._live[key] = self._live.get(key, 0) + 1
        conn.name, conn.connected_at = name, now
        if old is None:
            self.stats.success += 1
            log.info(
                "auto-registered WorkloadEntry %s/%s%s",
                conn.namespace,
                name,
                " with health checking enabled" if group.spec.probe is not None else "",
            )
        else:
            self.stats.updates += 1
            log.info("WorkloadEntry %s/%s reconnected", conn.namespace, name)

    async def _health(self, conn: _Conn, healthy: bool, message: str) -> None:
        async with self._lock:
            res = self.store.get("WorkloadEntry", conn.namespace, conn.name)
            if res is None:
                raise RegistrationError(f"WorkloadEntry {conn.namespace}/{conn.name} is gone")
            if HEALTH_CHECKS_ANNOTATION not in res.annotations:
                return  # not eligible for health updates (its group has no probe)
            now = timestamp(self.cp.clock.time())
            cond: dict[str, Any] = {
                "type": "Healthy",
                "status": "True" if healthy else "False",
                "lastProbeTime": now,
                "lastTransitionTime": now,
            }
            if message and not healthy:
                cond["message"] = message
            doc = document_of(res)
            doc["status"] = {"conditions": [cond]}
            await self.store.put(doc)
        conn.healthy = healthy
        log.log(
            logging.INFO if healthy else logging.WARNING,
            "WorkloadEntry %s/%s is %s%s",
            conn.namespace,
            conn.name,
            "healthy" if healthy else "UNHEALTHY",
            f": {message}" if message and not healthy else "",
        )

    async def _disconnected(self, conn: _Conn) -> None:
        key = (conn.namespace, conn.name)
        count = self._live.get(key, 0) - 1
        if count > 0:
            self._live[key] = count
            return
        self._live.pop(key, None)
        if getattr(self.cp, "_closing", False):
            return  # the control plane stops: the registrant reconnects to the next one
        try:
            await self._mark_disconnected(conn.namespace, conn.name, conn.connected_at)
        except Exception:  # the sweep retries; never fail the handler
            self.stats.errors += 1
            log.warning("could not mark %s/%s disconnected", *key, exc_info=True)

    async def _mark_disconnected(self, namespace: str, name: str, since: float | None) -> None:
        async with self._lock:
            if (namespace, name) in self._live:
                return  # reconnected meanwhile
            res = self.store.get("WorkloadEntry", namespace, name)
            if res is None or CONNECTED_AT not in res.annotations:
                return
            connected = parse_timestamp(res.annotations[CONNECTED_AT]) or 0.0
            if since is not None and connected > since + 1e-3:
                return  # a newer connection (maybe through another replica) owns it
            doc = document_of(res)
            annotations = doc["metadata"]["annotations"]
            annotations.pop(CONNECTED_AT, None)
            annotations[DISCONNECTED_AT] = timestamp(self.cp.clock.time())
            await self.store.put(doc)
        self.stats.unregister += 1
        log.info(
            "WorkloadEntry %s/%s disconnected; removed in %gs unless it reconnects",
            namespace,
            name,
            self.grace_period,
        )

    # ------------------------------------------------------------------ the sweep

    def _is_leader(self) -> bool:
        backend = getattr(self.cp, "backend", None)
        return bool(getattr(backend, "is_leader", True))

    async def sweep(self) -> int:
        """Delete auto-registered entries disconnected for longer than the grace period, and
        mark disconnected those nobody holds (after a control plane restart); returns deletes."""
        if not self._is_leader():
            return 0
        now = self.cp.clock.time()
        deleted = 0
        settled = self.cp.clock.monotonic() - self._started >= self.grace_period
        embedded = self._single_replica()
        groups = {
            (r.namespace, r.name)
            for r in self.cp.store.resources
            if getattr(r, "kind", "") == "WorkloadGroup"
        }
        for res in self.store.entries():
            ann = res.annotations
            if AUTO_REGISTRATION_GROUP not in ann:
                continue
            key = (res.namespace, res.name)
            if (res.namespace, ann[AUTO_REGISTRATION_GROUP]) not in groups:
                deleted += await self._collect(res)
                continue
            if CONNECTED_AT in ann:
                mine = embedded or ann.get(CONTROLLER) == self.controller
                if settled and mine and key not in self._live:
                    await self._mark_disconnected(res.namespace, res.name, None)
                continue
            gone = parse_timestamp(ann.get(DISCONNECTED_AT, ""))
            if gone is not None and now - gone < self.grace_period:
                continue
            async with self._lock:
                if key in self._live:
                    continue
                if await self.store.delete(res.namespace, res.name):
                    deleted += 1
                    self.stats.deletes += 1
                    log.info(
                        "cleaned up auto-registered WorkloadEntry %s/%s (disconnected for "
                        "longer than the grace period, %gs)",
                        res.namespace,
                        res.name,
                        self.grace_period,
                    )
        return deleted

    async def _collect(self, res: Any) -> int:
        """Delete an entry whose WorkloadGroup is gone (Kubernetes' garbage collector does it
        in Istio, through the entry's ownerReference) and end its registrants' sessions."""
        group = res.annotations[AUTO_REGISTRATION_GROUP]
        for ws in list(self._sessions.pop((res.namespace, res.name), set())):
            await ws.send_json(
                {"type": "error", "error": f"WorkloadGroup {res.namespace}/{group} was deleted"}
            )
            await ws.close(code=4004, message=b"WorkloadGroup deleted")
        async with self._lock:
            self._live.pop((res.namespace, res.name), None)
            if not await self.store.delete(res.namespace, res.name):
                return 0
        self.stats.deletes += 1
        log.info(
            "deleted WorkloadEntry %s/%s: its WorkloadGroup %s is gone",
            res.namespace,
            res.name,
            group,
        )
        return 1

    async def run(self) -> None:
        """The sweep, every quarter grace period (at most 1 s); an owned task of the server."""
        self._started = self.cp.clock.monotonic()
        while True:
            await asyncio.sleep(min(1.0, max(0.05, self.grace_period / 4)))
            try:
                await self.sweep()
            except Exception:  # keep sweeping
                self.stats.errors += 1
                log.warning("WorkloadEntry sweep failed", exc_info=True)
