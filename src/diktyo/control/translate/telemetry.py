"""Telemetry: the Telemetry API resources that apply to a workload, merged into one policy.

Selection (Istio's ``applicableTelemetries``): the mesh-wide one (root namespace
``istio-system``, no selector), the namespace-wide one (the workload's namespace, no
selector) and the workload one (the workload's namespace, ``selector.matchLabels`` matching
its labels); at each level the first in input order. Telemetries with ``targetRef(s)`` are
not applied (gateway/waypoint attachment; analyze warns).

Merging goes from the widest to the narrowest, entry by entry, each entry applying to the
directions its ``match.mode`` names (CLIENT = outbound, SERVER = inbound; default both):

- tracing: ``providers``, ``randomSamplingPercentage`` and ``disableSpanReporting`` replace
  the wider value when set; ``customTags`` are added, a narrower tag replacing one of the
  same name. The mesh file's ``tracing.sampling`` is the starting sampling percentage.
- access logging: an entry turns logging on, or off with ``disabled: true``; its
  ``filter.expression`` replaces the wider filter. The mesh file's ``accessLog.enabled`` is
  the starting state. A filter outside diktyo's CEL subset (``diktyo.telemetry.cel``) is
  dropped, so every request is logged, and analyze warns. diktyo has one access log sink (and one trace sink): provider names
  are kept for display, every provider writes to it.
- metrics: every ``overrides`` entry is kept in order (mesh, namespace, workload); the
  sidecar applies them in order at scrape time, later ones winning. ``UPSERT`` values are
  CEL; string literals (``"'canary'"``) are supported, other expressions are dropped here
  and reported by analyze.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from diktyo.control.translate.hosts import selector_matches
from diktyo.control.translate.scope import ROOT_NAMESPACE
from diktyo.snapshot.model import (
    AccessLogPolicy,
    CustomTag,
    MeshConfig,
    MetricOverride,
    Node,
    TelemetryPolicy,
    TracingPolicy,
)
from diktyo.telemetry import cel

CLIENT, SERVER = "client", "server"


def _directions(match: Any) -> tuple[str, ...]:
    mode = match.mode if match is not None and match.mode else "CLIENT_AND_SERVER"
    return {"CLIENT": (CLIENT,), "SERVER": (SERVER,)}.get(mode, (CLIENT, SERVER))


def applicable(telemetries: Iterable[Any], node: Node) -> list[Any]:
    """The Telemetry resources for ``node``, widest first: mesh, namespace, workload."""
    mesh = namespace = workload = None
    for t in telemetries:
        if t.spec.target_ref is not None or t.spec.target_refs:
            continue
        sel = t.spec.selector
        labels = sel.match_labels if sel is not None else {}
        if not labels:
            if t.namespace == ROOT_NAMESPACE:
                mesh = mesh or t
            elif t.namespace == node.namespace:
                namespace = namespace or t
        elif (
            t.namespace == node.namespace
            and workload is None
            and selector_matches(labels, node.labels)
        ):
            workload = t
    return [t for t in (mesh, namespace, workload) if t is not None]


def literal_value(expression: str) -> str | None:
    """The string a CEL string literal stands for (``'x'`` or ``"x"``), else None."""
    e = expression.strip()
    if len(e) >= 2 and e[0] == e[-1] and e[0] in "'\"" and e[0] not in e[1:-1]:
        return e[1:-1]
    return None


def build_telemetry(
    resources: Iterable[Any], node: Node, mesh: MeshConfig
) -> TelemetryPolicy | None:
    """The merged policy for ``node``; None when no Telemetry applies (mesh defaults hold)."""
    chain = applicable((r for r in resources if getattr(r, "kind", "") == "Telemetry"), node)
    if not chain:
        return None
    tracing: dict[str, dict[str, Any]] = {
        d: {
            "sampling": mesh.tracing.sampling,
            "span_reporting": True,
            "custom_tags": {},
            "providers": (),
        }
        for d in (CLIENT, SERVER)
    }
    logs: dict[str, dict[str, Any]] = {
        d: {"enabled": mesh.access_log.enabled, "filter": "", "providers": ()}
        for d in (CLIENT, SERVER)
    }
    overrides: list[MetricOverride] = []
    for t in chain:
        for tr in t.spec.tracing:
            for d in _directions(tr.match):
                cur = tracing[d]
                if tr.providers:
                    cur["providers"] = tuple(p.name for p in tr.providers)
                if tr.random_sampling_percentage is not None:
                    cur["sampling"] = float(tr.random_sampling_percentage)
                if tr.disable_span_reporting is not None:
                    cur["span_reporting"] = not tr.disable_span_reporting
                for name, tag in tr.custom_tags.items():
                    ct = _custom_tag(name, tag)
                    if ct is not None:
                        cur["custom_tags"][name] = ct
        for al in t.spec.access_logging:
            for d in _directions(al.match):
                cur = logs[d]
                cur["enabled"] = not bool(al.disabled)
                if al.providers:
                    cur["providers"] = tuple(p.name for p in al.providers)
                if al.filter is not None and al.filter.expression is not None:
                    # outside diktyo's CEL subset: log unfiltered (analyze warns)
                    ok = cel.check(al.filter.expression) is None
                    cur["filter"] = al.filter.expression if ok else ""
        for m in t.spec.metrics:
            for ov in m.overrides:
                mo = _override(ov)
                if mo is not None:
                    overrides.append(mo)

    def tp(d: str) -> TracingPolicy:
        cur = tracing[d]
        return TracingPolicy(
            sampling=cur["sampling"],
            span_reporting=cur["span_reporting"],
            custom_tags=tuple(cur["custom_tags"].values()),
            providers=cur["providers"],
        )

    def lp(d: str) -> AccessLogPolicy:
        cur = logs[d]
        return AccessLogPolicy(
            enabled=cur["enabled"], filter=cur["filter"], providers=cur["providers"]
        )

    return TelemetryPolicy(
        client_tracing=tp(CLIENT),
        server_tracing=tp(SERVER),
        client_access_log=lp(CLIENT),
        server_access_log=lp(SERVER),
        metrics=tuple(overrides),
        sources=tuple(f"{t.namespace}/{t.name}" for t in chain),
    )


def _custom_tag(name: str, tag: Any) -> CustomTag | None:
    if tag.literal is not None:
        return CustomTag(name=name, kind="literal", value=tag.literal.value)
    if tag.environment is not None:
        env = tag.environment
        return CustomTag(
            name=name, kind="environment", value=env.name, default=env.default_value or ""
        )
    if tag.header is not None:
        h = tag.header
        return CustomTag(
            name=name, kind="header", value=h.name.lower(), default=h.default_value or ""
        )
    return None  # formatter: not supported (analyze warns)


def _override(ov: Any) -> MetricOverride | None:
    match = ov.match
    if match is not None and match.custom_metric is not None:
        return None  # custom metrics: not supported (analyze warns)
    upsert: dict[str, str] = {}
    remove: list[str] = []
    for tag, op in ov.tag_overrides.items():
        if op.operation == "REMOVE":
            remove.append(tag)
        elif op.value is not None:
            value = literal_value(op.value)
            if value is not None:
                upsert[tag] = value
    return MetricOverride(
        metric=(match.metric if match is not None and match.metric else "ALL_METRICS"),
        mode=(match.mode if match is not None and match.mode else "CLIENT_AND_SERVER"),
        disabled=ov.disabled,
        upsert=upsert,
        remove=tuple(remove),
    )
