"""Scope: which services a sidecar sees, from the Sidecar resource's ``egress`` hosts (Istio).

Selection as in Istio: a Sidecar in the workload's namespace whose ``workloadSelector``
matches the workload's labels, else the one without selector in that namespace, else the
one without selector in the root namespace (``istio-system``). Without any, the workload
sees every service. Each egress host is ``namespace/dnsName``: ``*`` for any namespace,
``.`` for the Sidecar's own, ``~`` for none; dnsName is an FQDN, ``*`` or ``*.suffix``.
An egress listener with a ``port`` limits its hosts to that service port.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from diktyo.control.model import Service
from diktyo.control.translate.hosts import ConfigIndex, host_matches, selector_matches
from diktyo.snapshot.model import Node

ROOT_NAMESPACE = "istio-system"

Visible = Callable[[Service, int | None], bool]


def select_sidecar(idx: ConfigIndex, node: Node) -> Any | None:
    """The Sidecar resource that applies to ``node`` (first in input order at each level)."""
    if node.mode != "sidecar":
        return None
    for sc in idx.sidecars:
        ws = sc.spec.workload_selector
        selected = ws is not None and ws.labels and selector_matches(ws.labels, node.labels)
        if sc.namespace == node.namespace and selected:
            return sc
    for ns in (node.namespace, ROOT_NAMESPACE):
        for sc in idx.sidecars:
            ws = sc.spec.workload_selector
            if sc.namespace == ns and (ws is None or not ws.labels):
                return sc
    return None


def egress_scope(idx: ConfigIndex, node: Node) -> Visible | None:
    """A predicate ``visible(service, port)`` (port None: any port), or None for "all"."""
    sc = select_sidecar(idx, node)
    if sc is None or not sc.spec.egress:
        return None
    rules: list[tuple[int | None, str, str]] = []
    for listener in sc.spec.egress:
        port = listener.port.number if listener.port is not None else None
        for entry in listener.hosts:
            ns, _, host = entry.partition("/") if "/" in entry else ("*", "", entry)
            if ns == ".":
                ns = sc.namespace
            rules.append((port, ns, host))

    def visible(svc: Service, port: int | None) -> bool:
        for rule_port, ns, host in rules:
            if ns == "~" or (ns != "*" and ns != svc.namespace):
                continue
            if rule_port is not None and port is not None and rule_port != port:
                continue
            short = svc.short_name
            if host_matches(host, svc.hostname) or (short and host == short):
                return True
        return False

    return visible
