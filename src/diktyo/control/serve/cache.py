"""Snapshot cache: translate and encode once per distinct (proxy, config version), keep bytes.

``SnapshotCache.rebuild(push, proxies)`` translates every proxy against a new
``PushContext``. A proxy whose snapshot content did not change keeps its version (no push);
otherwise its version becomes ``<push version>-<content hash>``. The encoded bytes are cached
so every long poll answer is a plain write of prebuilt bytes.

With a translator that has ``build(proxy, push)`` (``diktyo.control.translate.cache.
PushTranslator``), the work shared between proxies is done once per view per push, each
proxy's encode splices pre-encoded JSON fragments, and an entry keeps its bytes as chunks
whose shared ones are the same objects for every proxy of a view (``Entry.data`` joins them,
a ~2 us copy per answer; see ``docs/control-plane.md``).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import msgspec

from diktyo.control.model import ProxyNode, PushContext
from diktyo.snapshot.codec import encode
from diktyo.snapshot.model import Snapshot

log = logging.getLogger(__name__)

Translator = Callable[[ProxyNode, PushContext], Snapshot]

_VERSION_PREFIX = b'{"version":"'


@dataclass(frozen=True, slots=True)
class Entry:
    version: str
    digest: str
    snapshot: Snapshot
    parts: tuple[bytes, ...]  # the encoded snapshot (wire format) in chunks

    @property
    def data(self) -> bytes:
        """The encoded snapshot (wire format)."""
        parts = self.parts
        return parts[0] if len(parts) == 1 else b"".join(parts)


def encode_versioned(body: bytes, version: str) -> bytes:
    """``body`` (a snapshot encoded with ``version=""``, or its first chunk) re-labelled.

    ``version`` is the first field of ``Snapshot``, so this is one splice instead of a second
    encode; the result equals ``encode(replace(snapshot, version=version))``.
    """
    empty = _VERSION_PREFIX + b'"'
    if not body.startswith(empty):  # pragma: no cover - guards a Snapshot field reorder
        raise ValueError("encoded snapshot does not start with its version field")
    return b"".join((_VERSION_PREFIX, msgspec.json.encode(version)[1:], body[len(empty) :]))


@dataclass(slots=True)
class Built:
    """One proxy's translation, before the cache keeps it (``SnapshotCache.compute``)."""

    node_id: str
    snapshot: Snapshot | None
    parts: list[bytes]
    digest: str
    error: str


class SnapshotCache:
    def __init__(self, translator: Translator) -> None:
        self._lock = threading.Lock()  # the translator's own caches are not thread-safe
        self._translate = translator
        self._build = getattr(translator, "build", None)
        self._entries: dict[str, Entry] = {}
        self.errors: dict[str, str] = {}  # node id -> translate error (kept old entry)
        self.encodes = 0

    def get(self, node_id: str) -> Entry | None:
        return self._entries.get(node_id)

    def drop(self, node_id: str) -> None:
        self._entries.pop(node_id, None)
        self.errors.pop(node_id, None)

    def rebuild(self, push: PushContext, proxies: Iterable[ProxyNode]) -> list[str]:
        """Translate each proxy; return the node ids whose version changed."""
        return self.install(push, self.compute(push, proxies))

    def compute(self, push: PushContext, proxies: Iterable[ProxyNode]) -> list[Built]:
        """Translate and encode (the heavy part); changes nothing here, so it can run in a
        worker thread while the event loop keeps serving. One translation at a time."""
        out: list[Built] = []
        build = self._build
        with self._lock:
            for proxy in proxies:
                node_id = proxy.node.id
                try:
                    if build is not None:
                        built = build(proxy, push)
                        snap = built.snapshot
                        parts = built.parts(version="")
                    else:
                        snap = self._translate(proxy, push)
                        parts = [encode(msgspec.structs.replace(snap, version=""))]
                    h = hashlib.sha256()
                    for part in parts:
                        h.update(part)
                    digest = h.hexdigest()[:12]
                except Exception as exc:  # a translate bug must not stop other proxies' pushes
                    log.warning("translate failed for %s: %s", node_id, exc, exc_info=True)
                    out.append(Built(node_id, None, [], "", f"{type(exc).__name__}: {exc}"))
                    continue
                out.append(Built(node_id, snap, parts, digest, ""))
        return out

    def install(self, push: PushContext, results: Iterable[Built]) -> list[str]:
        """Keep what ``compute`` built (on the loop); return the node ids whose version changed."""
        changed: list[str] = []
        build = self._build
        for b in results:
            node_id, snap, parts, digest = b.node_id, b.snapshot, b.parts, b.digest
            if b.error or snap is None:
                self.errors[node_id] = b.error
                continue
            self.errors.pop(node_id, None)
            old = self._entries.get(node_id)
            if old is not None and old.digest == digest:
                if build is not None:
                    # same content, same version; but point the entry at this push's shared
                    # fragments so the previous push's ones can be freed
                    parts[0] = encode_versioned(parts[0], old.version)
                    snap = msgspec.structs.replace(snap, version=old.version)
                    self._entries[node_id] = Entry(old.version, digest, snap, tuple(parts))
                continue
            version = f"{push.version}-{digest[:8]}"
            snap = msgspec.structs.replace(snap, version=version)
            parts[0] = encode_versioned(parts[0], version)
            self._entries[node_id] = Entry(version, digest, snap, tuple(parts))
            self.encodes += 1
            changed.append(node_id)
        return changed
