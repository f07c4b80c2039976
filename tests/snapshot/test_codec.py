import pytest

from diktyo.snapshot import SnapshotError, decode, encode, from_builtins
from diktyo.snapshot.model import (
    Cluster,
    Endpoint,
    Listener,
    Node,
    Route,
    RouteTable,
    Snapshot,
    VirtualHost,
    WeightedCluster,
)


def _snap() -> Snapshot:
    return Snapshot(
        version="7",
        node=Node(id="productpage-v1-1.default", workload="productpage-v1"),
        listeners=(Listener(name="outbound", direction="outbound", route_table="out"),),
        route_tables=(
            RouteTable(
                name="out",
                virtual_hosts=(
                    VirtualHost(
                        name="reviews",
                        domains=("reviews", "reviews:9080"),
                        routes=(Route(clusters=(WeightedCluster(cluster="c1"),)),),
                    ),
                ),
            ),
        ),
        clusters=(Cluster(name="c1", endpoints=(Endpoint(address="127.0.0.1", port=1),)),),
    )


def test_round_trip_is_identity() -> None:
    snap = _snap()
    assert decode(encode(snap)) == snap


def test_unknown_field_is_rejected_whole() -> None:
    with pytest.raises(SnapshotError, match="bogus"):
        decode(b'{"version":"1","node":{"id":"a","workload":"a"},"bogus":1}')


def test_dangling_cluster_reference_is_rejected() -> None:
    data = encode(_snap()).replace(b'"cluster":"c1"', b'"cluster":"nope"')
    with pytest.raises(SnapshotError, match="unknown cluster 'nope'"):
        decode(data)


def test_from_builtins_checks_types() -> None:
    with pytest.raises(SnapshotError):
        from_builtins({"version": 1, "node": {"id": "a", "workload": "a"}})
