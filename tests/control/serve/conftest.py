"""Fixtures for control plane serve tests: a hand-made translator and proxy nodes."""

from __future__ import annotations

import pytest

from diktyo.control.model import ProxyNode, PushContext
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


def tiny_translate(proxy: ProxyNode, push: PushContext) -> Snapshot:
    """One outbound listener, one cluster per service with the registry's healthy endpoints."""
    clusters = []
    vhosts = []
    for svc in push.registry.services:
        eps = tuple(
            Endpoint(address=i.address, port=next(iter(i.ports.values())), workload=i.workload)
            for i in push.registry.instances
            if svc.hostname in i.services
        )
        name = f"outbound|9080||{svc.hostname}"
        clusters.append(Cluster(name=name, service=svc.hostname, endpoints=eps))
        vhosts.append(
            VirtualHost(
                name=svc.hostname,
                domains=(svc.short_name or svc.hostname,),
                routes=(Route(name="default", clusters=(WeightedCluster(cluster=name),)),),
            )
        )
    for res in push.resources:  # resources are plain strings in these tests
        vhosts.append(VirtualHost(name=str(res), domains=(str(res),), routes=()))
    return Snapshot(
        version="",
        node=proxy.node,
        listeners=(
            Listener(
                name="outbound", direction="outbound", port=proxy.outbound_port, route_table="out"
            ),
        ),
        route_tables=(RouteTable(name="out", virtual_hosts=tuple(vhosts)),),
        clusters=tuple(clusters),
    )


def proxy(i: int) -> ProxyNode:
    return ProxyNode(node=Node(id=f"app-{i}.default", workload="app"), outbound_port=15000 + i)



@pytest.fixture
def translate():
    return tiny_translate


@pytest.fixture
def make_proxy():
    return proxy
