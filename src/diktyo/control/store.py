"""Config store: Istio YAML from a watched folder plus resources applied over the API.

Theory of operation
-------------------
Two sources merge into one tuple of resources: the files of a folder (re-read when any
``*.yaml``/``*.yml`` file appears, disappears or changes mtime/size; polled every 0.5 s) and an
in-memory overlay filled by ``diktyo apply`` (``POST /v1/config``) and emptied by ``diktyo
delete``. An applied resource replaces a file resource with the same kind/namespace/name.

A change that does not load (any error from ``diktyo.api.load_paths``/``load_text``) is
rejected whole: the store keeps serving its last good resources and records the errors
(``FILE:LINE:COL: error: ...``) for ``diktyo apply`` and the dashboard.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ResourceKey = tuple[str, str, str]  # (kind, namespace, name)


def resource_key(res: Any) -> ResourceKey:
    """(kind, namespace, name) of a loaded resource, whatever wrapper the api layer uses."""
    meta = getattr(res, "metadata", None)
    kind = (
        getattr(res, "qualified_kind", None)
        or getattr(res, "kind", None)
        or type(getattr(res, "spec", res)).__name__
    )
    name = getattr(res, "name", None) or getattr(meta, "name", None) or ""
    ns = getattr(res, "namespace", None) or getattr(meta, "namespace", None) or "default"
    return (str(kind), str(ns), str(name))


@dataclass(frozen=True, slots=True)
class LoadOutcome:
    resources: tuple[Any, ...]
    errors: tuple[str, ...]


def _load_paths(paths: list[Path]) -> LoadOutcome:
    from diktyo.api import load_paths

    result = load_paths(list[str | Path](paths))
    return LoadOutcome(tuple(result.resources), tuple(str(e) for e in result.errors))


def _load_text(text: str, source: str) -> LoadOutcome:
    from diktyo.api import load_text

    result = load_text(text, source)
    return LoadOutcome(tuple(result.resources), tuple(str(e) for e in result.errors))


def _only_errors(errors: tuple[str, ...]) -> tuple[str, ...]:
    """Errors that reject a config (warnings and infos do not)."""
    return tuple(e for e in errors if ": warning: " not in e and ": info: " not in e)


@dataclass(frozen=True, slots=True)
class StoreView:
    """The store's layers at one moment (copies): files < external sources < applied."""

    files: dict[ResourceKey, Any]
    sources: tuple[dict[ResourceKey, Any], ...]
    applied: dict[ResourceKey, Any]

    def resources(self, extra: tuple[Any, ...] = ()) -> tuple[Any, ...]:
        """Merged resources, with ``extra`` applied on top (what an apply would serve)."""
        merged = dict(self.files)
        for source in self.sources:
            merged.update(source)
        merged.update(self.applied)
        for res in extra:
            merged[resource_key(res)] = res
        return tuple(merged.values())


@dataclass(frozen=True, slots=True)
class PreparedApply:
    resources: tuple[Any, ...]
    errors: tuple[str, ...]
    warnings: tuple[str, ...]


class ConfigStore:
    """Files of ``directory`` (optional) + applied overlay; ``on_change()`` after each change."""

    def __init__(
        self,
        directory: str | Path | None = None,
        *,
        load_paths: Callable[[list[Path]], LoadOutcome] = _load_paths,
        load_text: Callable[[str, str], LoadOutcome] = _load_text,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.directory = Path(directory) if directory else None
        self._load_paths = load_paths
        self._load_text = load_text
        self.on_change = on_change
        self._files: dict[ResourceKey, Any] = {}
        self._applied: dict[ResourceKey, Any] = {}
        self._sources: dict[str, dict[ResourceKey, Any]] = {}  # external: kubernetes, etcd, ...
        self.source_errors: dict[str, tuple[str, ...]] = {}
        self._stamp: tuple[tuple[str, float, int], ...] = ()
        self.errors: tuple[str, ...] = ()  # errors of the last rejected change ("" if good)
        self.warnings: tuple[str, ...] = ()
        self.generation = 0

    # ------------------------------------------------------------------ reading

    @property
    def resources(self) -> tuple[Any, ...]:
        merged = dict(self._files)
        for source in self._sources.values():
            merged.update(source)
        merged.update(self._applied)
        return tuple(merged.values())

    def resource_keys(self) -> list[ResourceKey]:
        keys = set(self._files) | set(self._applied)
        for source in self._sources.values():
            keys |= set(source)
        return sorted(keys)

    # ------------------------------------------------------------------ files

    def _scan(self) -> tuple[tuple[str, float, int], ...]:
        if self.directory is None or not self.directory.is_dir():
            return ()
        out = []
        for p in sorted(self.directory.rglob("*")):
            if p.suffix in (".yaml", ".yml") and p.is_file():
                try:
                    st = p.stat()
                except FileNotFoundError:
                    continue
                out.append((str(p), st.st_mtime, st.st_size))
        return tuple(out)

    def reload_files(self, force: bool = False) -> bool:
        """Re-read the folder if anything changed; True if the served config changed."""
        stamp = self._scan()
        if stamp == self._stamp and not force:
            return False
        self._stamp = stamp
        return self._use_files(self._load_paths([Path(s[0]) for s in stamp]))

    async def reload_files_async(self) -> bool:
        """``reload_files`` with the loading (the heavy part) in a worker thread."""
        stamp = self._scan()
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        outcome = await asyncio.to_thread(self._load_paths, [Path(s[0]) for s in stamp])
        if stamp != self._stamp:
            return False  # a newer scan took over meanwhile
        return self._use_files(outcome)

    def _use_files(self, outcome: LoadOutcome) -> bool:
        errors = _only_errors(outcome.errors)
        if errors:
            self.errors = errors
            log.warning(
                "config in %s rejected, still serving the last good config:\n  %s",
                self.directory,
                "\n  ".join(errors),
            )
            return False
        self.errors = ()
        self.warnings = tuple(e for e in outcome.errors if e not in errors)
        self._files = {resource_key(r): r for r in outcome.resources}
        self._changed()
        return True

    async def watch(self, interval: float = 0.5) -> None:
        """Poll the folder forever (run it as an owned task; cancel to stop)."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.reload_files_async()
            except Exception:  # never let the watcher die on a bad file system moment
                log.warning("config folder scan failed", exc_info=True)

    # ------------------------------------------------------------------ external sources

    def set_source(self, name: str, resources: Any, errors: Any = ()) -> None:
        """Replace everything an external source (Kubernetes CRDs, etcd) holds.

        Unlike a file, a source is not rejected whole: its loadable resources are served and
        the problems of the others are kept in ``source_errors[name]``.
        """
        new = {resource_key(r): r for r in resources}
        self.source_errors[name] = tuple(str(e) for e in errors)
        if new != self._sources.get(name):
            self._sources[name] = new
            self._changed()

    # ------------------------------------------------------------------ apply / delete

    def apply_text(
        self, text: str, source: str = "<api>"
    ) -> tuple[list[ResourceKey], tuple[str, ...]]:
        """Apply YAML text; returns (keys applied, errors). Errors reject the whole text."""
        outcome = self._load_text(text, source)
        errors = _only_errors(outcome.errors)
        if errors:
            return [], errors
        return self.commit(outcome.resources), ()

    # an apply in two steps, so the heavy part runs off the event loop (``ControlPlane``):
    # ``view()`` on the loop, ``prepare()`` in a worker thread, ``commit()`` on the loop

    def view(self) -> StoreView:
        """A copy of what the store holds now, for ``prepare`` to work on in another thread."""
        return StoreView(
            dict(self._files), tuple(dict(s) for s in self._sources.values()), dict(self._applied)
        )

    def prepare(self, files: list[tuple[str, str]]) -> PreparedApply:
        """Load ``[(source, text)]`` (thread-safe: touches no store state). All or nothing."""
        resources: list[Any] = []
        errors: list[str] = []
        warnings: list[str] = []
        for source, text in files:
            outcome = self._load_text(text, source)
            bad = _only_errors(outcome.errors)
            errors += bad
            warnings += [e for e in outcome.errors if e not in bad]
            resources += outcome.resources
        return PreparedApply(tuple(resources), tuple(errors), tuple(warnings))

    def commit(self, resources: tuple[Any, ...] | list[Any]) -> list[ResourceKey]:
        keys = []
        for res in resources:
            key = resource_key(res)
            self._applied[key] = res
            keys.append(key)
        if keys:
            self._changed()
        return keys

    def delete_text(
        self, text: str, source: str = "<api>"
    ) -> tuple[list[ResourceKey], tuple[str, ...]]:
        """Delete the resources named in YAML text (only the identity of each matters)."""
        keys, errors = self.names_in(text, source)
        if not keys:
            return [], errors
        return self.delete_keys(keys)

    def names_in(
        self, text: str, source: str = "<api>"
    ) -> tuple[list[ResourceKey], tuple[str, ...]]:
        """The resources named in YAML text, or (if none) the errors that hid them."""
        outcome = self._load_text(text, source)
        keys = [resource_key(r) for r in outcome.resources]
        if not keys and outcome.errors:
            return [], _only_errors(outcome.errors)
        return keys, ()

    # the applied layer as a replica of a shared store (``control/etcd/backend.py``)

    def replace_applied(self, applied: dict[ResourceKey, Any]) -> None:
        """Make the applied layer exactly ``applied`` (a store's full state)."""
        if applied != self._applied:
            self._applied = dict(applied)
            self._changed()

    def set_applied(self, key: ResourceKey, res: Any | None) -> None:
        """One applied resource changed in the store (``None``: deleted or unloadable)."""
        if res is None:
            if self._applied.pop(key, None) is not None:
                self._changed()
        elif self._applied.get(key) is not res:
            self._applied[key] = res
            self._changed()

    def problems_deleting(
        self, keys: list[ResourceKey]
    ) -> tuple[list[ResourceKey], tuple[str, ...]]:
        """Why ``keys`` (not in the applied layer) cannot be deleted."""
        return self._delete(keys, dry=True)

    def delete_keys(self, keys: list[ResourceKey]) -> tuple[list[ResourceKey], tuple[str, ...]]:
        return self._delete(keys, dry=False)

    def _delete(
        self, keys: list[ResourceKey], dry: bool
    ) -> tuple[list[ResourceKey], tuple[str, ...]]:
        deleted, problems = [], []
        for key in keys:
            if key in self._applied and not dry:
                del self._applied[key]
                deleted.append(key)
            elif key in self._files:
                problems.append(
                    f"{key[0]} {key[1]}/{key[2]} comes from a file in {self.directory}; "
                    "remove it from that file instead"
                )
            else:
                problems.append(f"{key[0]} {key[1]}/{key[2]} not found")
        if deleted:
            self._changed()
        return deleted, tuple(problems)

    def _changed(self) -> None:
        self.generation += 1
        if self.on_change is not None:
            self.on_change()
