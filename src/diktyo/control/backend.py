"""Where the control plane keeps its state: the store interface and its embedded backend.

Theory of operation
-------------------
The control plane serves from two local objects, whatever the backend: ``ConfigStore``
(config resources) and ``LiveRegistry`` (services, instances). A backend decides where
their content lives and who else sees it:

- ``EmbeddedBackend`` (the default, ``diktyo up`` / ``demo``): the two objects *are* the
  state, in this process; writes land at once, this process is always the leader.
- ``EtcdBackend`` (``diktyo control-plane --store etcd://...``, ``control/etcd/backend.py``):
  etcd holds config, registry, proxies and the encrypted CA root; every replica's local
  objects follow an etcd watch, and ``commit`` is a compare-and-swap on the revisions the
  replica validated against.

``commit``/``delete`` are the only ways an apply reaches the store. ``StoreConflict`` means
another replica changed one of the same resources first (the caller re-validates against
the fresh state and tries again); ``StoreUnavailable`` means the store cannot take writes
now (its message names the cause) and nothing was changed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from diktyo.control.store import ResourceKey

if TYPE_CHECKING:
    from diktyo.control.server import ControlPlane


class StoreUnavailable(Exception):
    """The store cannot take this write now; nothing was changed."""


class StoreConflict(Exception):
    """Another writer changed a resource this write was based on (compare-and-swap failed)."""


class StoreBackend(Protocol):
    """What ``ControlPlane`` needs from a backend."""

    kind: str  # "embedded" | "etcd"
    replica_id: str
    scoped: bool  # True: translate only the proxies ``serves()`` names (replicas)

    @property
    def is_leader(self) -> bool:
        """Whether this process runs the singleton duties (health checks, CA rotation, cleanup)."""
        ...

    def attach(self, cp: ControlPlane) -> None:
        """Bind to a control plane (called from its constructor)."""

    async def start(self) -> None:
        """Load the stored state into the local objects and follow it (before serving)."""

    async def stop(self) -> None: ...

    async def commit(
        self, resources: Sequence[Any], files: Sequence[tuple[str, str]]
    ) -> list[ResourceKey]:
        """Store applied ``resources`` (loaded from ``files``) all together, or raise."""
        ...

    async def delete(
        self, keys: Sequence[ResourceKey]
    ) -> tuple[list[ResourceKey], tuple[str, ...]]:
        """Delete applied resources: (deleted keys, problems of the others)."""
        ...

    async def catch_up(self) -> None:
        """Wait until the local objects hold everything the store had when this was called."""

    def note_connection(self, node_id: str) -> None:
        """``node_id``'s sidecar long-polls this replica (shown by ``proxy-status``)."""

    def connection_of(self, node_id: str) -> str:
        """The replica (id) ``node_id`` is connected to, "" if unknown."""
        ...

    def serves(self, node_id: str) -> bool:
        """Whether this process translates ``node_id``'s snapshots (pushes to it)."""
        ...

    def proxy_changed(self, node_id: str) -> None:
        """A proxy registered or left on this replica (the etcd backend shares it)."""

    def describe(self) -> dict[str, Any]:
        """For ``/v1/replicas`` and the dashboard: backend, replicas, leader."""
        ...


class EmbeddedBackend:
    """Today's single-process state: the ``ConfigStore`` overlay and ``LiveRegistry`` in memory."""

    kind = "embedded"
    scoped = False

    def __init__(self) -> None:
        self.replica_id = "embedded"
        self._cp: ControlPlane | None = None

    @property
    def is_leader(self) -> bool:
        return True

    def attach(self, cp: ControlPlane) -> None:
        self._cp = cp

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def commit(
        self, resources: Sequence[Any], files: Sequence[tuple[str, str]]
    ) -> list[ResourceKey]:
        assert self._cp is not None
        return self._cp.store.commit(list(resources))

    async def delete(
        self, keys: Sequence[ResourceKey]
    ) -> tuple[list[ResourceKey], tuple[str, ...]]:
        assert self._cp is not None
        return self._cp.store.delete_keys(list(keys))

    async def catch_up(self) -> None:
        return None

    def note_connection(self, node_id: str) -> None:
        return None

    def connection_of(self, node_id: str) -> str:
        assert self._cp is not None
        st = self._cp.status.get(node_id)
        return self.replica_id if st is not None and st.polls else ""

    def proxy_changed(self, node_id: str) -> None:
        return None

    def serves(self, node_id: str) -> bool:
        return True

    def describe(self) -> dict[str, Any]:
        url = self._cp.url if self._cp is not None else ""
        return {
            "backend": "embedded",
            "replica": self.replica_id,
            "leader": self.replica_id,
            "replicas": [{"id": self.replica_id, "url": url, "leader": True}],
        }
