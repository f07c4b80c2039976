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

from typing import Any

import msgspec

# per struct class: (field name, default) of the defaults an equal value may not be
# identical to (str, int, float, bytes, non-empty tuple); containers built by a factory are
# omitted when empty whatever their identity, and None/True/False are singletons
_PLANS: dict[type, tuple[tuple[str, Any], ...]] = {}
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
    plan = tuple((f.name, f.default) for f in msgspec.structs.fields(cls) if _may_differ(f.default))
    _PLANS[cls] = plan
    return plan


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
            plan = _PLANS[type(self)]
        except KeyError:
            plan = _plan(type(self))
        for name, default in plan:
            value = getattr(self, name)
            if value is not default and value == default and type(value) is type(default):
                msgspec.structs.force_setattr(self, name, default)
