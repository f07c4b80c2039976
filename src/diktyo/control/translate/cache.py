"""The config generator: snapshots for many proxies, computing per-view work once per push.

This is the only snapshot assembler (``translate(proxy, push)`` is a fresh ``PushTranslator``
used once), with its caches inside it, as Istio's ``ConfigGenerator`` holds its cluster and
route caches.

Most of a sidecar's snapshot does not depend on the sidecar itself: the config index, the
outbound route table and the outbound clusters depend only on the push and on the proxy's
*view* of it (mode, namespace, labels, trust domain; labels and namespace decide the Sidecar
scope and ``sourceLabels``/``sourceNamespace`` matches). ``PushTranslator`` computes those
once per distinct view per push and builds only the per-proxy parts (listeners, node,
inbound clusters, gateway tables, security) for each proxy. Sharing never changes a result:
one generator used for many proxies gives what a fresh one gives for each (tested, including
a Hypothesis property).

``PushTranslator.build(proxy, push)`` also returns a *wire* twin of the snapshot whose shared
parts are one-byte markers (``msgspec.Raw(b"\\0")``; a NUL byte never occurs in msgspec's
JSON) and the pre-encoded fragments they stand for (``Built.shared``, the same ``bytes``
objects for every proxy of a view). ``Built.parts()`` encodes only the per-proxy bytes and
interleaves them with the shared fragments: ``b"".join(built.parts()) ==
codec.encode(built.snapshot)``, and a cache that keeps the parts keeps one copy of the shared
bytes per view instead of one per proxy. Never read the wire twin's fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec

from diktyo.control.model import ProxyNode, PushContext
from diktyo.control.translate.capture import build_capture, capture_listeners, interception
from diktyo.control.translate.clusters import build_cluster, build_outbound_clusters
from diktyo.control.translate.hosts import ConfigIndex
from diktyo.control.translate.listeners import (
    gateway_listeners,
    inbound,
    local_port_listeners,
    outbound_listeners,
)
from diktyo.control.translate.routes import (
    RouteContext,
    build_gateway_table,
    build_outbound_table,
    gateway_servers,
)
from diktyo.control.translate.scope import Visible, egress_scope
from diktyo.control.translate.telemetry import build_telemetry
from diktyo.security.translate import SECURITY_KINDS, build_security
from diktyo.snapshot.model import Cluster, RouteTable, Snapshot, cluster_name

_encoder = msgspec.json.Encoder()
MARK = msgspec.Raw(b"\0")  # where a shared fragment goes in the wire twin's encoding

ViewKey = tuple[str, str, str, tuple[tuple[str, str], ...]]


@dataclass(frozen=True, slots=True)
class Built:
    """One proxy's snapshot and its wire twin (same JSON, shared parts pre-encoded)."""

    snapshot: Snapshot
    wire: Snapshot
    shared: tuple[bytes, ...]  # the fragments for the wire twin's markers, in order

    def parts(self, version: str | None = None) -> list[bytes]:
        """The encoded snapshot as chunks (join them for the bytes); ``version`` overrides
        the snapshot's version."""
        wire = self.wire if version is None else msgspec.structs.replace(self.wire, version=version)
        segments = _encoder.encode(wire).split(b"\0")
        if len(segments) != len(self.shared) + 1:  # pragma: no cover - a marker got lost
            raise AssertionError("wire snapshot markers do not match its shared fragments")
        out = [segments[0]]
        for frag, seg in zip(self.shared, segments[1:], strict=True):
            out += (frag, seg)
        return out


@dataclass(slots=True)
class _View:
    """What every proxy with one view of one push shares."""

    visible: Visible | None
    table: RouteTable
    table_raw: bytes
    needed: frozenset[tuple[str, int, str]]
    outbound: dict[str, Cluster]  # build_outbound_clusters(...)
    clusters: list[Cluster]  # outbound + clusters for ``needed`` (the common final list)
    clusters_raw: bytes = b""  # the encoded ``clusters``, comma-separated
    raw: dict[str, bytes] = field(default_factory=dict)  # cluster name -> encoded
    extra: dict[tuple[str, int, str], Cluster] = field(default_factory=dict)


@dataclass(slots=True)
class _Push:
    push: PushContext
    idx: ConfigIndex
    security_resources: list[Any]
    telemetries: list[Any] = field(default_factory=list)  # Telemetry API resources
    views: dict[ViewKey, _View] = field(default_factory=dict)


def view_key(proxy: ProxyNode, push: PushContext) -> ViewKey:
    """Everything of ``proxy`` that the shared parts of its snapshot depend on."""
    node = proxy.node
    trust_domain = push.mesh.trust_domain or node.trust_domain
    return (node.mode, node.namespace, trust_domain, tuple(sorted(node.labels.items())))


class PushTranslator:
    """``translate`` with per-push, per-view sharing; callable like ``translate``.

    Keeps the state of the newest push only (a different ``PushContext`` starts afresh), so
    memory is bounded by the number of distinct views, not proxies.
    """

    def __init__(self) -> None:
        self._state: _Push | None = None
        self.views_built = 0  # how many views were computed (tests, stats)

    def __call__(self, proxy: ProxyNode, push: PushContext) -> Snapshot:
        return self.build(proxy, push).snapshot

    def build(self, proxy: ProxyNode, push: PushContext) -> Built:
        state = self._push_state(push)
        key = view_key(proxy, push)
        view = state.views.get(key)
        if view is None:
            view = self._build_view(state, proxy, key[2])
            state.views[key] = view
        return self._build_proxy(state, view, proxy, key[2])

    # ------------------------------------------------------------------ internals

    def _push_state(self, push: PushContext) -> _Push:
        state = self._state
        # an equal push (e.g. the control plane's push for a newly registered proxy, which
        # rebuilds the context without a change) reuses the views: translate is pure
        if state is None or (state.push is not push and state.push != push):
            state = _Push(
                push=push,
                idx=ConfigIndex.build(push.resources, push.registry),
                security_resources=[
                    r for r in push.resources if getattr(r, "kind", "") in SECURITY_KINDS
                ],
                telemetries=[r for r in push.resources if getattr(r, "kind", "") == "Telemetry"],
            )
            self._state = state
        return state

    def _build_view(self, state: _Push, proxy: ProxyNode, trust_domain: str) -> _View:
        idx = state.idx
        visible = egress_scope(idx, proxy.node)
        ctx = RouteContext(idx=idx, proxy=proxy, visible=visible)
        table = build_outbound_table(ctx)
        outbound = build_outbound_clusters(idx, proxy, trust_domain, visible)
        view = _View(
            visible=visible,
            table=table,
            table_raw=_encoder.encode(table),
            needed=frozenset(ctx.needed),
            outbound=outbound,
            clusters=[],
        )
        clusters = dict(outbound)
        for host, port, subset in sorted(view.needed):
            name = cluster_name(port, subset, host)
            if name not in clusters:
                clusters[name] = self._extra(state, view, proxy, host, port, subset, trust_domain)
        view.clusters = list(clusters.values())
        view.raw = {c.name: _encoder.encode(c) for c in view.clusters}
        view.clusters_raw = b",".join(view.raw[c.name] for c in view.clusters)
        self.views_built += 1
        return view

    @staticmethod
    def _extra(
        state: _Push,
        view: _View,
        proxy: ProxyNode,
        host: str,
        port: int,
        subset: str,
        trust_domain: str,
    ) -> Cluster:
        key = (host, port, subset)
        c = view.extra.get(key)
        if c is None:
            idx = state.idx
            c = build_cluster(idx, proxy, idx.service(host), host, port, subset, trust_domain)
            view.extra[key] = c
        return c

    def _build_proxy(self, state: _Push, view: _View, proxy: ProxyNode, trust_domain: str) -> Built:
        idx = state.idx
        push = state.push
        listeners = outbound_listeners(proxy)
        local, tcp_targets = local_port_listeners(proxy, idx)
        listeners += local
        tables: list[RouteTable] = [view.table]
        wire_tables: list[Any] = [MARK]
        frags: list[bytes] = [view.table_raw]
        needed: set[tuple[str, int, str]] | None = None
        if proxy.node.mode == "gateway":
            ctx = RouteContext(idx=idx, proxy=proxy, visible=view.visible, needed=set(view.needed))
            servers = gateway_servers(ctx)
            listeners += gateway_listeners(proxy, list(servers))
            for port in sorted(servers):
                t = build_gateway_table(ctx, port, servers[port])
                tables.append(t)
                wire_tables.append(t)
            needed = ctx.needed
        in_listeners, in_clusters = inbound(proxy, idx)
        extra: dict[str, Any] = {}
        if interception(proxy):  # transparent capture: 15001 / 15006 instead of per-port inbound
            listeners += capture_listeners(proxy)
            extra["capture"], cap_needed = build_capture(idx, proxy, view.visible, push.mesh)
            if not cap_needed <= (view.needed if needed is None else needed):
                needed = set(view.needed) if needed is None else needed
                needed |= cap_needed
        else:
            listeners += in_listeners
        if tcp_targets:
            needed = set(view.needed) if needed is None else needed
            for host, port, subset in tcp_targets:
                needed.add((host, port, subset))
        fast = needed is None or needed == view.needed
        if needed is None or fast:
            shared = view.clusters
        else:
            clusters = dict(view.outbound)
            for host, port, subset in sorted(needed):
                name = cluster_name(port, subset, host)
                if name not in clusters:
                    clusters[name] = self._extra(
                        state, view, proxy, host, port, subset, trust_domain
                    )
            shared = list(clusters.values())
        all_clusters = shared + in_clusters
        wire_clusters: list[Any] = []
        if fast and shared:
            wire_clusters.append(MARK)  # every shared cluster in one fragment
            frags.append(view.clusters_raw)
        else:
            raw = view.raw
            for c in shared:
                enc = raw.get(c.name)
                if enc is None:
                    wire_clusters.append(c)
                else:
                    wire_clusters.append(MARK)
                    frags.append(enc)
        wire_clusters += in_clusters
        sec = state.security_resources
        if sec:
            extra["security"] = build_security(proxy.node, sec)
        if state.telemetries:
            extra["telemetry"] = build_telemetry(state.telemetries, proxy.node, push.mesh)
        snap = Snapshot(
            version=push.version,
            node=proxy.node,
            listeners=tuple(listeners),
            route_tables=tuple(tables),
            clusters=tuple(all_clusters),
            mesh=push.mesh,
            **extra,
        )
        wire = Snapshot(
            version=push.version,
            node=proxy.node,
            listeners=snap.listeners,
            route_tables=tuple(wire_tables),
            clusters=tuple(wire_clusters),
            mesh=push.mesh,
            **extra,
        )
        return Built(snapshot=snap, wire=wire, shared=tuple(frags))
