"""Snapshot cache: translate and encode once per distinct (proxy, config version), keep bytes.

``SnapshotCache.rebuild(push, proxies)`` translates every proxy against a new
``PushContext``. A proxy whose snapshot content did not change keeps its version (no push);
otherwise its version becomes ``<push version>-<content hash>``. The encoded bytes are cached
so every long poll answer is a plain write of prebuilt bytes.

With a translator that has ``build(proxy, push)`` (``diktyo.control.translate.cache.
PushTranslator``), the work shared between proxies is done once per view per push and each
proxy's encode splices pre-encoded JSON fragments (see ``docs/control-plane.md``).
"""

from __future__ import annotations

import hashlib
import logging
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
    data: bytes  # encoded snapshot (wire format)


def encode_versioned(body: bytes, version: str) -> bytes:
    """``body`` (a snapshot encoded with ``version=""``) re-labelled with ``version``.

    ``version`` is the first field of ``Snapshot``, so this is one splice instead of a second
    encode; the result equals ``encode(replace(snapshot, version=version))``.
    """
    empty = _VERSION_PREFIX + b'"'
    if not body.startswith(empty):  # pragma: no cover - guards a Snapshot field reorder
        raise ValueError("encoded snapshot does not start with its version field")
    return b"".join((_VERSION_PREFIX, msgspec.json.encode(version)[1:], body[len(empty) :]))


class SnapshotCache:
    def __init__(self, translator: Translator) -> None:
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
        changed: list[str] = []
        build = self._build
        for proxy in proxies:
            node_id = proxy.node.id
            try:
                if build is not None:
                    built = build(proxy, push)
                    snap, wire = built.snapshot, built.wire
                else:
                    snap = wire = self._translate(proxy, push)
                body = encode(msgspec.structs.replace(wire, version=""))
                digest = hashlib.sha256(body).hexdigest()[:12]
            except Exception as exc:  # a translate bug must not stop other proxies' pushes
                log.warning("translate failed for %s: %s", node_id, exc, exc_info=True)
                self.errors[node_id] = f"{type(exc).__name__}: {exc}"
                continue
            self.errors.pop(node_id, None)
            old = self._entries.get(node_id)
            if old is not None and old.digest == digest:
                continue
            version = f"{push.version}-{digest[:8]}"
            snap = msgspec.structs.replace(snap, version=version)
            self._entries[node_id] = Entry(version, digest, snap, encode_versioned(body, version))
            self.encodes += 1
            changed.append(node_id)
        return changed
