"""SnapshotCache: cached bytes are exactly the encoded snapshot, with its version spliced in."""

from __future__ import annotations

import msgspec
import pytest

from diktyo.control.model import ProxyNode, PushContext, Registry, Service, ServicePort
from diktyo.control.serve.cache import SnapshotCache, encode_versioned
from diktyo.control.translate import translate
from diktyo.control.translate.cache import PushTranslator
from diktyo.snapshot.codec import decode, encode
from diktyo.snapshot.model import Node, Snapshot

REG = Registry(
    services=(
        Service(
            hostname="reviews.default.svc.cluster.local",
            ports=(ServicePort(9080),),
            short_name="reviews",
        ),
    )
)


@pytest.mark.parametrize("version", ["", "3-abcdef12", 'odd"ver\\sion\u00e9'])
def test_encode_versioned_equals_a_full_encode(version: str) -> None:
    snap = Snapshot(version="", node=Node(id="a", workload="a"))
    assert encode_versioned(encode(snap), version) == encode(
        msgspec.structs.replace(snap, version=version)
    )


@pytest.mark.parametrize("shared", [True, False])
def test_cached_bytes_equal_plain_translate_and_encode(shared: bool) -> None:
    cache = SnapshotCache(PushTranslator() if shared else translate)
    proxies = [
        ProxyNode(node=Node(id=f"n{i}", workload=f"w{i}", labels={"app": "x"}), outbound_port=i)
        for i in range(1, 20)
    ]
    push = PushContext(resources=(), registry=REG, version="5")
    assert len(cache.rebuild(push, proxies)) == len(proxies)
    for p in proxies:
        entry = cache.get(p.node.id)
        assert entry is not None and entry.version.startswith("5-")
        want = msgspec.structs.replace(translate(p, push), version=entry.version)
        assert entry.snapshot == want
        assert entry.data == encode(want)
        assert decode(entry.data) == want
    if shared:  # the route table and clusters are one copy for all: only the rest per proxy
        a, b = cache.get("n1"), cache.get("n2")
        assert a is not None and b is not None and len(a.parts) > 1
        assert all(x is y for x, y in zip(a.parts[1::2], b.parts[1::2], strict=True))
    # same content under a new push: nothing changes, nothing is pushed
    before = {p.node.id: cache.get(p.node.id) for p in proxies}
    assert cache.rebuild(PushContext(resources=(), registry=REG, version="6"), proxies) == []
    for node_id, old in before.items():
        new = cache.get(node_id)
        assert old is not None and new is not None
        assert (new.version, new.data, new.snapshot) == (old.version, old.data, old.snapshot)
        if shared:  # but it now holds the new push's shared fragments, not the old ones
            assert new.parts[1] == old.parts[1] and new.parts[1] is not old.parts[1]
