"""The etcd store backend: control-plane replicas sharing config, registry, proxies and CA.

Theory of operation
-------------------
Keys (all under ``/diktyo/``):

=============================== ===================================================
``config/<kind>/<ns>/<name>``   applied resource: ``{source, offset, text}`` (its YAML
                                document, so a reload keeps file and line)
``registry/services/<host>``    ``Service`` (JSON)
``registry/instances/<name>``   ``{instance, admin_url, unhealthy_since}``
``proxies/<node>``              ``ProxyNode``: any replica can serve any sidecar
``ca/identity``                 CA roots + bootstrap-token key, sealed (``secrets.py``)
``leader``                      replica id, on the leader's lease
``replicas/<id>``               ``{id, url}``, on that replica's lease
``connections/<node>``          replica id the sidecar long-polls, on that replica's lease
=============================== ===================================================

``start()`` reads the whole prefix once (revision R) into the local ``ConfigStore`` and
``LiveRegistry``, then one watch from R+1 applies every later change, whoever made it: a
replica's own writes come back through the same watch, so every replica's push is driven
by etcd. Applies are a transaction comparing each key's ``mod_revision`` with the one this
replica validated against (0 = absent): a concurrent change to the same resource fails the
compare (``StoreConflict``), the server re-validates on fresh state and retries, so no
update is lost. Registry and proxy writes are write-through: the local copy changes at once
and a writer task puts the newest value of each key (coalesced) until etcd takes it.

Each replica holds a lease (TTL ``lease_ttl``) refreshed every third of it; the leader is
whoever created ``leader`` on its lease (a transaction on ``create_revision == 0``). A
replica that cannot refresh its lease for a TTL steps down at once, before etcd expires
the key, so two leaders never act together for longer than clock drift. Leader-only:
health checks (``ControlPlane._health_loop``), CA root rotation, removal of registrations
unhealthy for longer than ``registration_grace``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

from diktyo.control.backend import StoreConflict, StoreUnavailable
from diktyo.control.etcd import secrets
from diktyo.control.etcd.gateway import (
    EtcdClient,
    EtcdError,
    EtcdUnavailable,
    Event,
    KeyValue,
    b64,
    created_equals,
    delete_op,
    mod_equals,
    put_op,
    range_op,
    unb64,
)
from diktyo.control.model import ProxyNode, Service, WorkloadInstance
from diktyo.control.serve.registry import LiveRegistry
from diktyo.control.store import ResourceKey, resource_key

if TYPE_CHECKING:
    from diktyo.control.server import ControlPlane

log = logging.getLogger(__name__)
T = TypeVar("T")

PREFIX = "/diktyo/"
CONFIG = PREFIX + "config/"
SERVICES = PREFIX + "registry/services/"
INSTANCES = PREFIX + "registry/instances/"
PROXIES = PREFIX + "proxies/"
IDENTITY = PREFIX + "ca/identity"
LEADER = PREFIX + "leader"
REPLICAS = PREFIX + "replicas/"
CONNECTIONS = PREFIX + "connections/"

_QUORUM_HINT = (
    "is a majority of the etcd members up? (etcdctl --endpoints=... endpoint health); the "
    "control plane keeps serving the last good config and retries"
)


def parse_etcd_url(spec: str) -> list[str]:
    """``etcd://a:2379,b:2379`` -> ``["http://a:2379", "http://b:2379"]``."""
    rest = spec.removeprefix("etcd://").strip("/")
    endpoints = []
    for part in rest.split(","):
        part = part.strip()
        if not part:
            continue
        host, sep, port = part.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(
                f"bad etcd endpoint {part!r} in {spec!r}: expected HOST:PORT, e.g. "
                "etcd://127.0.0.1:2379,127.0.0.1:22379"
            )
        endpoints.append(f"http://{host}:{port}")
    if not endpoints:
        raise ValueError(f"no etcd endpoint in {spec!r}: expected etcd://HOST:PORT[,HOST:PORT...]")
    return endpoints


def _decode(value: bytes | Any, typ: type[T]) -> T:
    raw = json.loads(value) if isinstance(value, bytes) else value
    return msgspec.convert(raw, typ, strict=False)


def config_key(key: ResourceKey) -> str:
    return f"{CONFIG}{key[0]}/{key[1]}/{key[2]}"


def _parse_config_key(k: str) -> ResourceKey:
    kind, ns, name = k[len(CONFIG) :].split("/", 2)
    return (kind, ns, name)


def document_of(res: Any, files: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """``{source, offset, text}``: the YAML document of ``files`` that ``res`` came from."""
    from diktyo.api.loader import _split_documents

    source = str(getattr(res, "file", "") or "")
    line = int(getattr(res, "line", 0) or 0)
    for src, text in files:
        if src != source:
            continue
        best: tuple[int, str] | None = None
        for offset, chunk in _split_documents(text):
            if best is None or offset < line:  # the last document starting before ``line``
                best = (offset, chunk)
        if best is not None:
            return {"source": src, "offset": best[0], "text": best[1]}
    raise ValueError(f"resource {resource_key(res)} is not in the applied files")


def load_document(doc: dict[str, Any], key: ResourceKey) -> Any:
    """The resource ``key`` from a stored document (None if it no longer loads)."""
    from diktyo.api import load_text

    text = "\n" * int(doc.get("offset", 0)) + str(doc["text"])
    result = load_text(text, str(doc.get("source") or "<etcd>"))
    for res in result.resources:
        if resource_key(res) == key:
            return res
    log.warning(
        "stored %s %s/%s does not load any more (%s); left out",
        *key,
        "; ".join(str(e) for e in result.errors) or "not in its document",
    )
    return None


class EtcdRegistry(LiveRegistry):
    """``LiveRegistry`` whose mutators also write to etcd (through the backend's writer)."""

    def __init__(self, backend: EtcdBackend, on_change: Any = None) -> None:
        super().__init__(on_change)
        self._backend = backend
        self.unhealthy_since: dict[str, float] = {}

    def add_service(self, service: Service) -> None:
        service = _decode(msgspec.to_builtins(service), Service)  # as every replica holds it
        super().add_service(service)
        self._backend.enqueue(SERVICES + service.hostname, msgspec.json.encode(service))

    def remove_service(self, hostname: str) -> bool:
        had = super().remove_service(hostname)
        self._backend.enqueue(SERVICES + hostname, None)
        return had

    def add_instance(self, instance: WorkloadInstance, admin_url: str | None = None) -> None:
        instance = _decode(msgspec.to_builtins(instance), WorkloadInstance)
        super().add_instance(instance, admin_url)
        self._write_instance(instance.name)

    def remove_instance(self, name: str) -> bool:
        had = super().remove_instance(name)
        self.unhealthy_since.pop(name, None)
        self._backend.enqueue(INSTANCES + name, None)
        return had

    def set_healthy(self, name: str, healthy: bool) -> bool:
        changed = super().set_healthy(name, healthy)
        if changed:
            if healthy:
                self.unhealthy_since.pop(name, None)
            else:
                self.unhealthy_since.setdefault(name, time.time())
            self._write_instance(name)
        return changed

    async def flush(self) -> None:
        await self._backend.flush()

    def _write_instance(self, name: str) -> None:
        inst = self.instances.get(name)
        if inst is None:
            return
        record = {
            "instance": msgspec.to_builtins(inst),
            "admin_url": self.admin_urls.get(name),
            "unhealthy_since": self.unhealthy_since.get(name),
        }
        self._backend.enqueue(INSTANCES + name, json.dumps(record).encode())

    # ---------------------------------------------------------------- from the watch

    def remote_put(self, key: str, value: bytes) -> None:
        if key.startswith(SERVICES):
            svc = _decode(value, Service)
            if self.services.get(svc.hostname) != svc:
                self.services[svc.hostname] = svc
                self._changed()
            return
        record = json.loads(value)
        inst = _decode(record["instance"], WorkloadInstance)
        if record.get("admin_url"):
            self.admin_urls[inst.name] = str(record["admin_url"])
        if record.get("unhealthy_since"):
            self.unhealthy_since[inst.name] = float(record["unhealthy_since"])
        else:
            self.unhealthy_since.pop(inst.name, None)
        if self.instances.get(inst.name) != inst:
            self.instances[inst.name] = inst
            self._changed()

    def remote_delete(self, key: str) -> None:
        if key.startswith(SERVICES):
            if self.services.pop(key[len(SERVICES) :], None) is not None:
                self._changed()
            return
        name = key[len(INSTANCES) :]
        self.admin_urls.pop(name, None)
        self.unhealthy_since.pop(name, None)
        if self.instances.pop(name, None) is not None:
            self._changed()


class EtcdBackend:
    """State in etcd at ``endpoints``; see the module docstring."""

    kind = "etcd"
    scoped = True  # each replica translates only the sidecars long-polling it

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        key_file: str | Path | None = None,
        replica_id: str | None = None,
        lease_ttl: int = 5,
        timeout: float = 3.0,
        registration_grace: float = 60.0,
        ca_rotate_before: float = 0.2,
    ) -> None:
        self.endpoints = list(endpoints)
        self.client = EtcdClient(self.endpoints, timeout=timeout)
        self.key_file = Path(key_file) if key_file else None
        self.replica_id = replica_id or f"{socket.gethostname()}-{os.getpid()}"
        self.lease_ttl = lease_ttl
        self.registration_grace = registration_grace
        self.ca_rotate_before = (
            ca_rotate_before  # rotate when this share of the root's life is left
        )
        self.revision = 0  # newest revision applied to the local objects
        self.config_revisions: dict[ResourceKey, int] = {}  # applied key -> mod_revision
        self.replicas: dict[str, dict[str, Any]] = {}
        self.connections: dict[str, str] = {}  # node -> replica id
        self.leader = ""
        self.lease = 0
        self.stats = {
            "conflicts": 0,
            "write_retries": 0,
            "watch_events": 0,
            "elections": 0,
            "lease_failures": 0,
        }
        self._lease_failing = False
        self._leading = False
        self._cp: ControlPlane | None = None
        self._key = b""
        self._pending: dict[str, tuple[bytes | None, bool]] = {}  # key -> (value, on lease)
        self._wrote_proxies: dict[str, bytes] = {}
        self._committed: dict[tuple[ResourceKey, int], Any] = {}  # parsed by our own commit
        self._wake_writer = asyncio.Event()
        self._campaign_now = asyncio.Event()
        self._flushed = asyncio.Event()
        self._revision_seen = asyncio.Condition()
        self._lease_ok_at = 0.0
        self._tasks: list[asyncio.Task[None]] = []

    # ---------------------------------------------------------------- wiring

    @property
    def is_leader(self) -> bool:
        return self._leading and time.monotonic() - self._lease_ok_at < self.lease_ttl

    def attach(self, cp: ControlPlane) -> None:
        self._cp = cp
        cp.registry = EtcdRegistry(self, on_change=cp.kick)

    @property
    def cp(self) -> ControlPlane:
        assert self._cp is not None, "EtcdBackend.attach(control_plane) first"
        return self._cp

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        self._wake_writer = asyncio.Event()
        self._campaign_now = asyncio.Event()
        self._flushed = asyncio.Event()
        self._flushed.set()
        self._revision_seen = asyncio.Condition()
        try:
            await self._load_identity()
            kvs, revision = await self.client.get_prefix(PREFIX)
            self.lease = await self.client.grant(self.lease_ttl)
        except BaseException as exc:
            await self.client.close()
            if not isinstance(exc, EtcdUnavailable):
                raise
            raise StoreUnavailable(
                f"etcd at {', '.join(self.endpoints)} is not answering: {exc}; start etcd "
                "first, or check the --store URL"
            ) from None
        self._lease_ok_at = time.monotonic()
        await self._load_all(kvs)
        self.revision = revision
        self.enqueue(
            REPLICAS + self.replica_id,
            json.dumps({"id": self.replica_id, "url": self.cp.url, "started": time.time()}),
            on_lease=True,
        )
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._watch_loop(revision + 1), name="etcd-watch"),
            loop.create_task(self._writer_loop(), name="etcd-writer"),
            loop.create_task(self._lease_loop(), name="etcd-lease"),
            loop.create_task(self._duties_loop(), name="etcd-duties"),
        ]
        log.info(
            "store: etcd %s at revision %d (replica %s, %d resources, %d instances, %d proxies)",
            ",".join(self.endpoints),
            revision,
            self.replica_id,
            len(self.config_revisions),
            len(self.cp.registry.instances),
            len(self.cp.proxies),
        )

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self.lease:
            await self.client.revoke(self.lease)  # leader key, replica and connections go now
            self.lease = 0
        self._leading = False
        await self.client.close()

    # ---------------------------------------------------------------- identity

    async def _load_identity(self) -> None:
        """Use the CA in etcd; the first replica ever stores its own (sealed)."""
        if self.key_file is None:
            raise StoreUnavailable(
                "the etcd store needs --store-key-file: the key that seals the mesh CA in etcd "
                "(the same file for every replica; created if absent)"
            )
        self._key = secrets.load_or_create_key(self.key_file)
        kv = await self.client.get(IDENTITY)
        if kv is None:
            blob = secrets.seal(self.cp.identity, self._key)
            result = await self.client.txn(
                [created_equals(IDENTITY, 0)], [put_op(IDENTITY, blob)], [range_op(IDENTITY)]
            )
            if result.succeeded:
                log.info("store: sealed a new mesh CA into etcd")
                return
            kvs = result.responses[0]["response_range"].get("kvs") or []
            kv = KeyValue.from_json(kvs[0])
        secrets.adopt(self.cp.identity, secrets.unseal(kv.value, self._key))
        log.info("store: mesh CA %s loaded from etcd", secrets.root_fingerprint(self.cp.identity))

    # ---------------------------------------------------------------- reading state

    async def _load_all(self, kvs: list[KeyValue]) -> None:
        config = [kv for kv in kvs if kv.key.startswith(CONFIG)]
        loaded = await asyncio.to_thread(self._load_config, config)
        applied = {}
        for key, rev, res in loaded:
            self.config_revisions[key] = rev
            if res is not None:
                applied[key] = res
        self.cp.store.replace_applied(applied)
        for kv in kvs:
            if not kv.key.startswith(CONFIG):
                self._apply_event(Event("PUT", kv))

    def _load_config(self, kvs: list[KeyValue]) -> list[tuple[ResourceKey, int, Any]]:
        out = []
        for kv in kvs:
            key = _parse_config_key(kv.key)
            res = self._committed.pop((key, kv.mod_revision), None)
            if res is None:
                res = load_document(json.loads(kv.value), key)
            out.append((key, kv.mod_revision, res))
        return out

    async def _watch_loop(self, start: int) -> None:
        while True:
            try:
                async for events in self.client.watch(PREFIX, start):
                    await self._apply_events(events)
                    start = self.revision + 1
            except asyncio.CancelledError:
                raise
            except EtcdError as exc:  # compacted: reload everything
                log.warning("store: watch lost (%s); reloading the whole state", exc)
                try:
                    kvs, revision = await self.client.get_prefix(PREFIX)
                except EtcdError:
                    await asyncio.sleep(1.0)
                    continue
                self._forget_missing(kvs)
                await self._load_all(kvs)
                await self._seen(revision)
                start = revision + 1
            except Exception:
                log.exception("store: watch failed; restarting it")
                await asyncio.sleep(1.0)

    def _forget_missing(self, kvs: list[KeyValue]) -> None:
        present = {kv.key for kv in kvs}
        for key in list(self.config_revisions):
            if config_key(key) not in present:
                self.config_revisions.pop(key)
        for name in list(self.cp.registry.instances):
            if INSTANCES + name not in present:
                self._apply_event(Event("DELETE", KeyValue(INSTANCES + name, b"", 0, 0)))
        for node in list(self.cp.proxies):
            if PROXIES + node not in present:
                self._apply_event(Event("DELETE", KeyValue(PROXIES + node, b"", 0, 0)))

    async def _apply_events(self, events: list[Event]) -> None:
        self.stats["watch_events"] += len(events)
        config = [e for e in events if e.kv.key.startswith(CONFIG)]
        if config:
            puts = [e.kv for e in config if e.type != "DELETE"]
            loaded = {
                (key, rev): res
                for key, rev, res in (await asyncio.to_thread(self._load_config, puts))
            }
            for e in config:
                key = _parse_config_key(e.kv.key)
                if e.type == "DELETE":
                    self.config_revisions.pop(key, None)
                    self.cp.store.set_applied(key, None)
                else:
                    self.config_revisions[key] = e.kv.mod_revision
                    self.cp.store.set_applied(key, loaded.get((key, e.kv.mod_revision)))
        for e in events:
            if not e.kv.key.startswith(CONFIG):
                try:
                    self._apply_event(e)
                except Exception:
                    log.warning("store: cannot apply %s %s", e.type, e.kv.key, exc_info=True)
        await self._seen(max(e.kv.mod_revision for e in events))

    async def _seen(self, revision: int) -> None:
        async with self._revision_seen:
            self.revision = max(self.revision, revision)
            self._revision_seen.notify_all()

    def _apply_event(self, e: Event) -> None:
        key, value, put = e.kv.key, e.kv.value, e.type != "DELETE"
        reg = self.cp.registry
        assert isinstance(reg, EtcdRegistry)
        if key.startswith((SERVICES, INSTANCES)):
            reg.remote_put(key, value) if put else reg.remote_delete(key)
        elif key.startswith(PROXIES):
            node = key[len(PROXIES) :]
            if put:
                self._wrote_proxies[node] = value
                proxy = _decode(value, ProxyNode)
                if self.cp.proxies.get(node) != proxy:
                    self.cp.add_proxy(proxy)
            else:
                self._wrote_proxies.pop(node, None)
                self.cp.remove_proxy(node)
        elif key.startswith(REPLICAS):
            rid = key[len(REPLICAS) :]
            if put:
                self.replicas[rid] = json.loads(value)
            else:
                self.replicas.pop(rid, None)
        elif key.startswith(CONNECTIONS):
            node = key[len(CONNECTIONS) :]
            if put:
                self.connections[node] = value.decode()
            else:
                self.connections.pop(node, None)
        elif key == LEADER:
            self.leader = value.decode() if put else ""
            if self.leader != self.replica_id:
                self._leading = False
            if not put:
                self._campaign_now.set()  # the leader left (or its lease expired): run now
        elif key == IDENTITY and put:
            try:
                before = secrets.root_fingerprint(self.cp.identity)
                secrets.adopt(self.cp.identity, secrets.unseal(value, self._key))
                now = secrets.root_fingerprint(self.cp.identity)
                if now != before:
                    log.info("store: mesh CA now %s (from etcd)", now)
            except secrets.SealError as exc:
                log.error("store: %s", exc)

    async def catch_up(self) -> None:
        """Wait until the watch delivered everything etcd holds now (at most 5 s)."""
        answer = await self._call("kv/range", {"key": b64(LEADER)})
        target = int(answer.get("header", {}).get("revision", 0))
        async with self._revision_seen:
            try:
                await asyncio.wait_for(
                    self._revision_seen.wait_for(lambda: self.revision >= target), 5.0
                )
            except TimeoutError:
                log.warning("store: watch is behind etcd (%d < %d)", self.revision, target)

    # ---------------------------------------------------------------- writes

    async def commit(
        self, resources: Sequence[Any], files: Sequence[tuple[str, str]]
    ) -> list[ResourceKey]:
        compare, ops, keys, parsed = [], [], [], []
        for res in resources:
            key = resource_key(res)
            doc = document_of(res, files)
            k = config_key(key)
            compare.append(mod_equals(k, self.config_revisions.get(key, 0)))
            ops.append(put_op(k, json.dumps(doc)))
            keys.append(key)
            parsed.append(res)
        if not keys:
            return []
        result = await self._txn(compare, ops)
        if not result.succeeded:
            self.stats["conflicts"] += 1
            raise StoreConflict("another replica changed one of these resources meanwhile")
        for key, res in zip(keys, parsed, strict=True):
            self._committed[(key, result.revision)] = res  # the watch need not parse it again
        await self._wait_revision(result.revision)
        return keys

    async def delete(
        self, keys: Sequence[ResourceKey]
    ) -> tuple[list[ResourceKey], tuple[str, ...]]:
        ours = [k for k in keys if k in self.config_revisions]
        others = [k for k in keys if k not in self.config_revisions]
        problems: tuple[str, ...] = ()
        if others:
            _, problems = self.cp.store.problems_deleting(others)
        if not ours:
            return [], problems
        compare = [mod_equals(config_key(k), self.config_revisions[k]) for k in ours]
        result = await self._txn(compare, [delete_op(config_key(k)) for k in ours])
        if not result.succeeded:
            self.stats["conflicts"] += 1
            raise StoreConflict("another replica changed one of these resources meanwhile")
        await self._wait_revision(result.revision)
        return ours, problems

    async def _wait_revision(self, revision: int, timeout: float = 5.0) -> None:
        """Read-your-writes: return once the watch applied ``revision`` locally."""
        async with self._revision_seen:
            try:
                await asyncio.wait_for(
                    self._revision_seen.wait_for(lambda: self.revision >= revision), timeout
                )
            except TimeoutError:
                log.warning("store: revision %d stored but not seen by the watch yet", revision)

    async def _txn(self, compare: list[Any], ops: list[Any]) -> Any:
        # a write that times out in etcd may still commit once quorum returns; a linearizable
        # read first (it needs a quorum, and proposes nothing) refuses it cleanly instead
        try:
            await self.client.call("kv/range", {"key": b64(LEADER)})
        except EtcdUnavailable as exc:
            raise StoreUnavailable(
                f"etcd has no quorum, nothing was written ({exc}); {_QUORUM_HINT}"
            ) from None
        try:
            return await self.client.txn(compare, ops)
        except EtcdUnavailable as exc:
            raise StoreUnavailable(
                f"etcd did not confirm the write ({exc}); it lost its quorum meanwhile, so the "
                f"write may still land when the quorum returns; {_QUORUM_HINT}"
            ) from None
        except EtcdError as exc:
            raise StoreUnavailable(f"etcd refused the write: {exc}") from None

    async def _call(self, path: str, body: dict[str, Any]) -> Any:
        try:
            return await self.client.call(path, body)
        except EtcdUnavailable as exc:
            raise StoreUnavailable(f"etcd is not answering ({exc}); {_QUORUM_HINT}") from None

    def enqueue(self, key: str, value: bytes | str | None, on_lease: bool = False) -> None:
        """Write ``value`` (None: delete) to ``key`` soon; a newer value replaces a queued one."""
        raw = value.encode() if isinstance(value, str) else value
        self._pending[key] = (raw, on_lease)
        self._flushed.clear()
        self._wake_writer.set()

    async def flush(self, timeout: float = 10.0) -> None:
        """Wait until every queued write is in etcd (``StoreUnavailable`` after ``timeout``)."""
        try:
            await asyncio.wait_for(self._flushed.wait(), timeout)
        except TimeoutError:
            raise StoreUnavailable(
                f"{len(self._pending)} registry writes still queued after {timeout:g} s; "
                + _QUORUM_HINT
            ) from None

    async def _writer_loop(self) -> None:
        delay = 0.1
        while True:
            await self._wake_writer.wait()
            self._wake_writer.clear()
            while self._pending:
                key, (value, on_lease) = next(iter(self._pending.items()))
                try:
                    if value is None:
                        await self.client.delete(key)
                    else:
                        await self.client.put(key, value, self.lease if on_lease else 0)
                except EtcdError as exc:
                    self.stats["write_retries"] += 1
                    log.warning("store: write of %s failed (%s); retrying", key, exc)
                    await asyncio.sleep(delay)
                    delay = min(2.0, delay * 2)
                    continue
                delay = 0.1
                if self._pending.get(key) == (value, on_lease):
                    del self._pending[key]
            self._flushed.set()

    # ---------------------------------------------------------------- proxies, connections

    def proxy_changed(self, node_id: str) -> None:
        proxy = self.cp.proxies.get(node_id)
        if proxy is None:
            if self._wrote_proxies.pop(node_id, None) is not None:
                self.enqueue(PROXIES + node_id, None)
            return
        raw = msgspec.json.encode(proxy)
        # the same objects every other replica decodes (see _interned)
        self.cp.proxies[node_id] = _decode(json.loads(raw), ProxyNode)
        if self._wrote_proxies.get(node_id) != raw:
            self._wrote_proxies[node_id] = raw
            self.enqueue(PROXIES + node_id, raw)

    def note_connection(self, node_id: str) -> None:
        if self.connections.get(node_id) != self.replica_id:
            self.connections[node_id] = self.replica_id
            self.enqueue(CONNECTIONS + node_id, self.replica_id, on_lease=True)

    def connection_of(self, node_id: str) -> str:
        return self.connections.get(node_id, "")

    def serves(self, node_id: str) -> bool:
        return self.connections.get(node_id) == self.replica_id

    def describe(self) -> dict[str, Any]:
        return {
            "backend": "etcd",
            "endpoints": self.endpoints,
            "replica": self.replica_id,
            "leader": self.leader,
            "revision": self.revision,
            "etcd_reachable": time.monotonic() - self._lease_ok_at < self.lease_ttl,
            "replicas": [
                {"id": rid, "url": r.get("url", ""), "leader": rid == self.leader}
                for rid, r in sorted(self.replicas.items())
            ],
            "stats": dict(self.stats),
        }

    # ---------------------------------------------------------------- lease, election

    async def _lease_loop(self) -> None:
        while True:
            try:  # every third of the TTL, or at once when the leader key goes away
                await asyncio.wait_for(self._campaign_now.wait(), self.lease_ttl / 3)
            except TimeoutError:
                pass
            self._campaign_now.clear()
            try:
                ttl = await self.client.keepalive(self.lease)
                if ttl <= 0:  # expired (etcd lost us for a TTL): a new lease, records again
                    log.warning(
                        "store: lease of replica %s expired; re-registering", self.replica_id
                    )
                    self._leading = False
                    self.lease = await self.client.grant(self.lease_ttl)
                    self._reregister()
                if self._lease_failing:
                    log.warning("store: etcd reachable again (replica %s)", self.replica_id)
                    self._lease_failing = False
                self._lease_ok_at = time.monotonic()
                await self._campaign()
            except EtcdError as exc:
                self.stats["lease_failures"] += 1
                if not self._lease_failing:
                    log.warning(
                        "store: cannot refresh replica %s's lease (%s); serving the last state "
                        "from etcd, applies fail until it is back",
                        self.replica_id,
                        exc,
                    )
                    self._lease_failing = True
                if self._leading and not self.is_leader:
                    log.warning("store: stepping down as leader: etcd unreachable (%s)", exc)
                    self._leading = False

    def _reregister(self) -> None:
        self.enqueue(
            REPLICAS + self.replica_id,
            json.dumps({"id": self.replica_id, "url": self.cp.url, "started": time.time()}),
            on_lease=True,
        )
        for node, rid in list(self.connections.items()):
            if rid == self.replica_id:
                self.enqueue(CONNECTIONS + node, self.replica_id, on_lease=True)

    async def _campaign(self) -> None:
        result = await self.client.txn(
            [created_equals(LEADER, 0)],
            [put_op(LEADER, self.replica_id, self.lease)],
            [range_op(LEADER)],
        )
        if result.succeeded:
            self.stats["elections"] += 1
            log.info("store: replica %s is the leader now", self.replica_id)
            self.leader = self.replica_id
            self._leading = True
            return
        kvs = result.responses[0].get("response_range", {}).get("kvs") or []
        holder = unb64(kvs[0].get("value", "")).decode() if kvs else ""
        self.leader = holder
        self._leading = holder == self.replica_id

    # ---------------------------------------------------------------- singleton duties

    async def _duties_loop(self, interval: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval)
            if not self.is_leader:
                continue
            try:
                self._cleanup_registrations()
                await self._rotate_ca_if_due()
            except EtcdError as exc:
                log.warning("store: leader duty failed: %s", exc)
            except Exception:
                log.exception("store: leader duty failed")

    def _cleanup_registrations(self) -> None:
        reg = self.cp.registry
        assert isinstance(reg, EtcdRegistry)
        now = time.time()
        for name, since in list(reg.unhealthy_since.items()):
            if now - since >= self.registration_grace:
                log.warning(
                    "store: removing instance %s: unhealthy for %.0f s (grace %.0f s)",
                    name,
                    now - since,
                    self.registration_grace,
                )
                reg.remove_instance(name)

    async def _rotate_ca_if_due(self) -> None:
        ca = self.cp.identity.ca
        cert = ca.root_cert
        start = cert.not_valid_before_utc.timestamp()
        end = cert.not_valid_after_utc.timestamp()
        if end - ca.clock.time() > (end - start) * self.ca_rotate_before:
            return
        kv = await self.client.get(IDENTITY)
        # two phases: the new root is trusted at once and signs one renewal period later, so
        # no workload meets a certificate from a root it does not trust yet
        ca.rotate_root(activate_after=ca.workload_lifetime / 2)
        blob = secrets.seal(self.cp.identity, self._key)
        result = await self.client.txn(
            [mod_equals(IDENTITY, kv.mod_revision if kv else 0)], [put_op(IDENTITY, blob)]
        )
        log.warning(
            "store: CA root rotated by leader %s (%s)",
            self.replica_id,
            "stored" if result.succeeded else "another replica rotated first",
        )
