"""Equal snapshots encode to equal bytes, however their values were built (``snapshot.base``).

msgspec omits a default field only when the value *is* the default object; before the fix a
value that merely equalled its default (decoded from JSON, rebuilt by a translator) was
written out, so equal snapshots hashed differently and sidecars got the same content again.
"""

from __future__ import annotations

import inspect
import json

import msgspec

from diktyo.snapshot import codec, model, security
from diktyo.snapshot.base import CanonicalStruct, SnapshotStruct, _plan
from diktyo.snapshot.model import (
    Cluster,
    ConnectionPool,
    Endpoint,
    Node,
    RetryPolicy,
    Snapshot,
)


def _fresh(value: object) -> object:
    """An equal value that is not the same object (what a decoder or a translator makes)."""
    if isinstance(value, str):
        return "".join(list(value))  # one-character strings are cached by CPython anyway
    if isinstance(value, float):
        return float(repr(value))
    if isinstance(value, int):
        return int(str(value))
    if isinstance(value, tuple):
        return tuple(iter(value))  # tuple(a_tuple) would return the same object
    return value


def _snap(**node: object) -> Snapshot:
    return Snapshot(
        version="",
        node=Node(id="a-1.default", workload="a", **node),  # type: ignore[arg-type]
        clusters=(
            Cluster(
                name="outbound|80||b.default.svc.cluster.local",
                endpoints=(Endpoint(address="127.0.0.1", port=1),),
                pool=ConnectionPool(
                    connect_timeout=_fresh(10.0),  # type: ignore[arg-type]
                    max_connections=_fresh(2**32 - 1),  # type: ignore[arg-type]
                ),
            ),
        ),
    )


def test_values_equal_to_their_default_encode_like_the_default() -> None:
    plain = Snapshot(
        version="",
        node=Node(id="a-1.default", workload="a"),
        clusters=(
            Cluster(
                name="outbound|80||b.default.svc.cluster.local",
                endpoints=(Endpoint(address="127.0.0.1", port=1),),
                pool=ConnectionPool(),
            ),
        ),
    )
    rebuilt = _snap(namespace=_fresh("default"), trust_domain=_fresh("cluster.local"))
    assert rebuilt == plain
    assert codec.encode(rebuilt) == codec.encode(plain)
    assert b"cluster.local\"" not in codec.encode(rebuilt).split(b'"clusters"')[0]


def test_a_struct_default_rebuilt_equal_is_left_out() -> None:
    """``Cluster.pool`` defaults to a ``ConnectionPool()``; an equal one built apart from it
    (a translator, a decoder) is not written out as ``"pool":{}``."""
    cluster = Cluster(name="c", pool=ConnectionPool())
    assert b"pool" not in msgspec.json.encode(cluster)


def test_decoded_defaults_encode_like_absent_ones() -> None:
    """A snapshot that spells its defaults out (another encoder, an older control plane)
    re-encodes to the bytes of one that leaves them out: same content, same digest."""
    minimal = codec.encode(Snapshot(version="", node=Node(id="a-1.default", workload="a")))
    explicit = json.loads(minimal)
    explicit["node"].update(namespace="default", service_account="default", mode="sidecar")
    again = codec.encode(codec.decode(json.dumps(explicit).encode()))
    assert again == minimal


def test_a_retry_policy_rebuilt_from_lists_encodes_like_the_default() -> None:
    default = RetryPolicy()
    rebuilt = msgspec.convert({"retry_on": list(default.retry_on), "attempts": 2}, RetryPolicy)
    assert rebuilt.retry_on is not None and rebuilt == default
    assert msgspec.json.encode(rebuilt) == msgspec.json.encode(default) == b"{}"


def test_every_snapshot_struct_with_such_a_default_canonicalizes() -> None:
    """A struct with a string/float/struct default that skipped ``CanonicalStruct`` would
    bring the quirk back for its fields (and a new field may add such a default)."""
    structs = [
        obj
        for mod in (model, security)
        for _, obj in inspect.getmembers(mod, inspect.isclass)
        if issubclass(obj, msgspec.Struct) and obj.__module__ == mod.__name__
    ]
    assert len(structs) > 40
    assert [s.__name__ for s in structs if not issubclass(s, SnapshotStruct)] == []
    need = [s.__name__ for s in structs if _plan(s) and not issubclass(s, CanonicalStruct)]
    assert need == []
