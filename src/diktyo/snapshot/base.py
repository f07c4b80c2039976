"""The base of every snapshot struct, and the one place that makes equal snapshots encode equally.

msgspec leaves a field out of an encoding (``omit_defaults``) only when its value *is* the
default object, not when it merely equals it. A value that equals its default but was built
elsewhere (a string decoded from JSON or etcd, a float parsed from YAML, a tuple rebuilt by
a translator) would then be written out, so two equal snapshots could encode, and hash, to
different bytes: a sidecar would be sent the same content again under a new version.
``CanonicalStruct.__post_init__`` (which msgspec runs on construction, ``decode`` and
``convert``) swaps such a value for the default object itself, so ``encode`` depends only on a snapshot's value.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

# per struct class: (field name, default) of the defaults an equal value may not be
# identical to (str, int, float, bytes, non-empty tuple); containers built by a factory are
# omitted when empty whatever their identity, and None/True/False are singletons
_PLANS: dict[type, Callable[[Any], None]] = {}
_NOT_SINGLETON = (str, int, float, bytes, tuple, msgspec.Struct)


def _may_differ(default: Any) -> bool:
    """Whether an equal value can be another object: not a bool, and not what CPython keeps
    one copy of (``""``, ``()``, small ints)."""
    if isinstance(default, bool) or not isinstance(default, _NOT_SINGLETON):
        return False
    if isinstance(default, int):
        return not -5 <= default <= 256
    return not (isinstance(default, str | bytes | tuple) and len(default) == 0)


def _plan(cls: type) -> tuple[tuple[str, Any], ...]:
    return tuple((f.name, f.default) for f in msgspec.structs.fields(cls) if _may_differ(f.default))


def _compile(cls: type) -> Callable[[Any], None]:
    """``cls``'s canonicalizer, written out field by field (about twice as fast as a loop over
    the plan: it runs for every struct a push builds). Field names are Python identifiers."""
    env: dict[str, Any] = {"set": msgspec.structs.force_setattr}
    lines = ["def canonical(self):"]
    for i, (name, default) in enumerate(_plan(cls)):
        env[f"d{i}"], env[f"t{i}"] = default, type(default)
        lines += [
            f"    v = self.{name}",
            f"    if v is not d{i} and type(v) is t{i} and v == d{i}: set(self, {name!r}, d{i})",
        ]
    if len(lines) == 1:
        lines.append("    pass")
    exec("\n".join(lines), env)  # noqa: S102 - generated from the class's own field names
    fn: Callable[[Any], None] = env["canonical"]
    _PLANS[cls] = fn
    return fn


class SnapshotStruct(
    msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=True
):
    """Base for every snapshot struct: immutable, keyword-only, strict on decode."""


class CanonicalStruct(SnapshotStruct, frozen=True):
    """Base for the snapshot structs with a default an equal value may not be identical to
    (``_may_differ``): equal values encode the same (see the module docstring). Only those
    structs pay for ``__post_init__``; a test checks that each of them derives from here."""

    def __post_init__(self) -> None:
        try:
            canonical = _PLANS[type(self)]
        except KeyError:
            canonical = _compile(type(self))
        canonical(self)
