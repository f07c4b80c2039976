"""Pure lookups for capture: original destination -> service, TCP route -> cluster.

``CaptureTable(capture)`` is compiled once per snapshot. ``outbound(ip, port)`` finds the
``CaptureService`` for a service VIP (exact address first, then the longest matching CIDR,
as Envoy's filter chain match prefers the most specific prefix); ``inbound(port)`` the
``CaptureInbound`` for a workload port. ``pick_tcp_cluster`` applies VirtualService ``tcp:``
rules: the first rule whose match holds (``port`` and ``destinationSubnets``; a rule without
``match`` always holds), then a weighted choice among its destinations; when no rule holds
the connection goes to the service's own cluster, as Istio adds a default TCP route.
"""

from __future__ import annotations

import ipaddress
import random

from diktyo.proxy.tcp_proxy import CompiledTcpRoutes, _network, weighted_choice
from diktyo.snapshot.model import Capture, CaptureInbound, CaptureService

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
__all__ = ["CaptureTable", "CompiledTcpRoutes", "weighted_choice"]

# Istio's names for the clusters of traffic outside the registry
PASSTHROUGH = "PassthroughCluster"
BLACKHOLE = "BlackHoleCluster"
INBOUND_PASSTHROUGH = "InboundPassthroughClusterIpv4"


class CaptureTable:
    """``Snapshot.capture`` compiled for lookups by original destination."""

    def __init__(self, capture: Capture) -> None:
        self.capture = capture
        exact: dict[tuple[str, int], CaptureService] = {}
        nets: list[tuple[int, Network, int, CaptureService]] = []
        for s in capture.services:
            try:
                net = _network(s.address)
            except ValueError as exc:
                raise ValueError(
                    f"capture service {s.host}: address {s.address!r}: {exc}"
                ) from None
            if net.num_addresses == 1 and "/" not in s.address:
                exact.setdefault((str(net.network_address), s.port), s)
            else:
                nets.append((net.prefixlen, net, s.port, s))
        nets.sort(key=lambda t: -t[0])
        self.exact = exact
        self.nets = tuple((n, p, s) for _, n, p, s in nets)
        self.inbound_ports: dict[int, CaptureInbound] = {}
        for i in capture.inbound:
            self.inbound_ports.setdefault(i.port, i)
        self.routes: dict[tuple[str, int], CompiledTcpRoutes] = {}
        for s in capture.services:
            if s.tcp_routes:
                self.routes[(s.address, s.port)] = CompiledTcpRoutes(s.tcp_routes)

    def outbound(self, ip: str, port: int) -> CaptureService | None:
        s = self.exact.get((ip, port))
        if s is not None:
            return s
        if self.nets:
            try:
                addr = ipaddress.ip_address(ip)
            except ValueError:
                return None
            for net, p, svc in self.nets:
                if p == port and addr.version == net.version and addr in net:
                    return svc
        return None

    def inbound(self, port: int) -> CaptureInbound | None:
        return self.inbound_ports.get(port)

    def tcp_cluster(self, svc: CaptureService, ip: str, port: int, rng: random.Random) -> str:
        """The cluster a TCP connection to ``svc`` goes to: a ``tcp:`` route's, else the default."""
        routes = self.routes.get((svc.address, svc.port))
        if routes:
            wc = routes.pick(ip, port, rng)
            if wc is not None:
                return wc.cluster
        # no tcp rule matched: the service's own cluster (Istio's default TCP route)
        return svc.cluster
