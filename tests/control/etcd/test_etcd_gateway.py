"""The etcd v3 JSON-gateway client against a real etcd: failover between endpoints, errors."""

from __future__ import annotations

import asyncio

import pytest

from diktyo.control.etcd.gateway import (
    EtcdClient,
    EtcdUnavailable,
    created_equals,
    mod_equals,
    put_op,
    range_op,
)
from diktyo.testing.etcd import EtcdCluster


async def test_a_dead_endpoint_is_skipped_and_remembered(etcd1: EtcdCluster) -> None:
    # refused at once on :9; the generous limit is for the real member on a loaded machine
    client = EtcdClient(["http://127.0.0.1:9", etcd1.client_urls[0]], timeout=5.0)
    try:
        rev = await client.put("/t/a", b"1")
        assert client.endpoint == etcd1.client_urls[0]
        kv = await client.get("/t/a")
        assert kv is not None and kv.value == b"1" and kv.mod_revision == rev
        kvs, _ = await client.get_prefix("/t/")
        assert [k.key for k in kvs] == ["/t/a"]
    finally:
        await client.close()


async def test_nothing_answering_names_every_endpoint() -> None:
    client = EtcdClient(["http://127.0.0.1:9", "http://127.0.0.1:11"], timeout=0.5)
    try:
        with pytest.raises(EtcdUnavailable) as err:
            await client.get("/x")
        assert "127.0.0.1:9" in str(err.value) and "127.0.0.1:11" in str(err.value)
    finally:
        await client.close()


async def test_txn_compare_and_watch_resume(etcd1: EtcdCluster) -> None:
    client = EtcdClient(etcd1.client_urls)
    try:
        first = await client.txn([created_equals("/t/k", 0)], [put_op("/t/k", "v1")])
        assert first.succeeded
        again = await client.txn(
            [created_equals("/t/k", 0)], [put_op("/t/k", "v2")], [range_op("/t/k")]
        )
        assert not again.succeeded and "response_range" in again.responses[0]
        ok = await client.txn([mod_equals("/t/k", first.revision)], [put_op("/t/k", "v3")])
        assert ok.succeeded
        seen: list[tuple[str, bytes]] = []

        async def follow() -> None:
            async for events in client.watch("/t/", first.revision):
                seen.extend((e.type, e.kv.value) for e in events)
                if len(seen) >= 3:
                    return

        task = asyncio.create_task(follow())
        await client.delete("/t/k")
        await asyncio.wait_for(task, 5)
        assert seen == [("PUT", b"v1"), ("PUT", b"v3"), ("DELETE", b"")]
    finally:
        await client.close()
