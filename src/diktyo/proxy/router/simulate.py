"""``simulate(snapshot, method, url, headers)``: what the sidecar would do with a request.

Runs the proxy's real compiled matcher (``RouteMatcher``) over the snapshot and reports the
matching VirtualService rule, why each earlier rule did not match (the first failing condition
of each match block), the destination (host, subset, port, cluster, endpoints) and the policies
that apply (timeout, retries, fault, mirror, rewrite, redirect, direct response). The same
engine answers ``diktyo explain``.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import msgspec

from diktyo.proxy.router.matcher import RequestInfo, RouteMatcher
from diktyo.snapshot.model import Listener, RetryPolicy, Route, Snapshot


def _builtins(obj: Any) -> Any:
    return None if obj is None else msgspec.to_builtins(obj)


def _rule(route: Route) -> dict[str, Any]:
    src = route.source
    out: dict[str, Any] = {
        "name": src.rule_name or route.name,
        "index": src.rule,
        "virtualService": f"{src.namespace}/{src.name}" if src.name else None,
        "kind": src.kind or "VirtualService",  # or HTTPRoute / GRPCRoute (Gateway API)
        "file": src.file or None,
        "line": src.line or None,
    }
    if src.delegate:
        out["delegate"] = {
            "virtualService": src.delegate,
            "index": src.delegate_rule,
            "file": src.delegate_file or None,
            "line": src.delegate_line or None,
        }
    return out


def _via(rule: dict[str, Any]) -> str:
    d = rule.get("delegate")
    if not d:
        return ""
    where = f" at {d['file']}:{d['line']}" if d.get("file") else ""
    return f" via delegate {d['virtualService']} rule {d['index']}{where}"


def simulate(
    snapshot: Snapshot,
    method: str,
    url: str,
    headers: dict[str, str] | None = None,
    listener: str | None = None,
) -> dict[str, Any]:
    """Explain how the sidecar running ``snapshot`` routes ``method url``."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    authority = parts.netloc
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    hdrs = {k.lower(): v for k, v in (headers or {}).items()}
    hdrs.setdefault("host", authority)
    lst = None
    for cand in snapshot.listeners:
        if (
            listener is None and cand.direction in ("outbound", "gateway")
        ) or cand.name == listener:
            lst = cand
            break
    if lst is None and listener is None:
        # transparent capture: an HTTP connection caught by virtualOutbound is routed on the
        # "outbound" table for its original destination port (proxy.capture.server)
        cap = next((c for c in snapshot.listeners if c.direction == "capture_outbound"), None)
        if cap is not None:
            port = parts.port or (443 if parts.scheme == "https" else 80)
            lst = Listener(
                name=cap.name, direction="outbound", route_table="outbound", service_port=port
            )
    out: dict[str, Any] = {
        "request": {"method": method, "authority": authority, "path": path, "headers": hdrs},
        "snapshotVersion": snapshot.version,
        "listener": lst.name if lst else None,
        "routeTable": lst.route_table if lst else None,
        "virtualHost": None,
        "virtualService": None,
        "rule": None,
        "skipped": [],
        "destination": None,
        "destinations": [],
        "cluster": None,
        "endpoints": [],
        "timeout": None,
        "retries": None,
        "fault": None,
        "mirror": None,
        "rewrite": None,
        "redirect": None,
        "directResponse": None,
        "headers": None,
        "result": None,
    }
    if lst is None:
        out["result"] = "no outbound listener in the snapshot"
        return out
    table = next((t for t in snapshot.route_tables if t.name == lst.route_table), None)
    if table is None:
        out["result"] = f"route table {lst.route_table!r} not found"
        return out
    matcher = RouteMatcher(table)
    eff_authority = lst.default_host or authority
    info = RequestInfo(
        method, path, eff_authority, hdrs, parts.scheme or "http", lst.service_port or None
    )
    cvh = matcher.find_virtual_host(eff_authority)
    if cvh is None:
        out["result"] = f"404 NR: no virtual host for authority {eff_authority!r}"
        return out
    out["virtualHost"] = cvh.vh.name
    selected = matcher.select(info)  # the proxy's own matching
    winner = selected[1] if selected is not None else None
    for cr in cvh.routes:
        if cr is winner:
            break
        out["skipped"].append({**_rule(cr.route), "reasons": cr.why_not(info)})
    if selected is None:
        out["result"] = "404 NR: no route matched"
        return out
    _, cr, bi = selected
    route = cr.route
    rule = _rule(route)
    rule["matchIndex"] = bi
    if route.matches:
        rule["match"] = _builtins(route.matches[bi])
    out["rule"] = rule
    out["virtualService"] = rule["virtualService"]
    if "delegate" in rule:
        out["delegate"] = rule["delegate"]["virtualService"]
    clusters = {c.name: c for c in snapshot.clusters}
    total = sum(max(0, wc.weight) for wc in route.clusters) or 1
    dests: list[dict[str, Any]] = []
    for wc in route.clusters:
        c = clusters.get(wc.cluster)
        dests.append(
            {
                "host": wc.host or (c.service if c else ""),
                "subset": wc.subset or (c.subset if c else ""),
                "port": wc.port if wc.port is not None else (c.port if c else None),
                "cluster": wc.cluster,
                "weight": round(100.0 * max(0, wc.weight) / total, 2),
                "upstreamProtocol": c.upstream_protocol if c else None,
            }
        )
    out["destinations"] = dests
    if dests:
        best = max(range(len(dests)), key=lambda i: dests[i]["weight"])
        out["destination"] = {k: dests[best][k] for k in ("host", "subset", "port")}
        c = clusters.get(dests[best]["cluster"])
        out["cluster"] = dests[best]["cluster"]
        if c is not None:
            out["endpoints"] = [
                {"address": e.address, "port": e.port, "labels": dict(e.labels)}
                for e in c.endpoints
            ]
            out["connectionPool"] = _builtins(c.pool)
            out["outlierDetection"] = _builtins(c.outlier)
            out["loadBalancer"] = _builtins(c.lb)
    out["timeout"] = route.timeout
    retries = route.retries if route.retries is not None else RetryPolicy()
    out["retries"] = {
        **{f: msgspec.to_builtins(getattr(retries, f)) for f in retries.__struct_fields__},
        "default": route.retries is None,
    }
    out["fault"] = _builtins(route.fault)
    out["mirror"] = [msgspec.to_builtins(m) for m in route.mirrors] or None
    out["rewrite"] = _builtins(route.rewrite)
    if route.rewrite is not None:
        out["rewrittenPath"] = cr.rewrite_path(path, bi)
    out["redirect"] = _builtins(route.redirect)
    out["directResponse"] = _builtins(route.direct_response)
    out["headers"] = _builtins(route.headers)
    if route.redirect is not None:
        out["result"] = f"{route.redirect.code} redirect"
    elif route.direct_response is not None:
        out["result"] = f"{route.direct_response.status} direct response"
    else:
        out["result"] = "forward"
    return out


def format_text(res: dict[str, Any]) -> str:
    """Human-readable rendering of ``simulate``'s result (``diktyo explain``)."""
    req = res["request"]
    lines = [f"{req['method']} http://{req['authority']}{req['path']}"]
    lines.append(
        f"  listener {res['listener']} -> route table {res['routeTable']}, "
        f"virtual host {res['virtualHost']}"
    )
    for s in res["skipped"]:
        why = "; ".join(s["reasons"]) or "no match"
        lines.append(
            f"  skipped rule {s['index']} {s['name']!r} ({s['virtualService']}{_via(s)}): {why}"
        )
    rule = res["rule"]
    if rule is None:
        lines.append(f"  result: {res['result']}")
        return "\n".join(lines) + "\n"
    where = f" at {rule['file']}:{rule['line']}" if rule.get("file") else ""
    if rule["virtualService"] is None:  # no route of the user's: the service's default route
        lines.append("  matched the default route of the service (no VirtualService or route)")
    else:
        lines.append(
            f"  matched rule {rule['index']} {rule['name']!r} of {rule['kind']} "
            f"{rule['virtualService']}{where}{_via(rule)} (match block {rule['matchIndex']})"
        )
    lines.append(f"  result: {res['result']}")
    for d in res["destinations"]:
        lines.append(
            f"  destination {d['host']} subset={d['subset'] or '-'} port={d['port']} "
            f"weight={d['weight']}% cluster={d['cluster']}"
            + (f" upstream={d['upstreamProtocol']}" if d.get("upstreamProtocol") else "")
        )
    if res["endpoints"]:
        eps = ", ".join(f"{e['address']}:{e['port']}" for e in res["endpoints"])
        lines.append(f"  endpoints: {eps}")
    lines.append(f"  timeout: {res['timeout'] if res['timeout'] else 'disabled'}")
    r = res["retries"]
    lines.append(
        f"  retries: attempts={r['attempts']} retryOn={','.join(r['retry_on'])}"
        f" perTryTimeout={r.get('per_try_timeout')}{' (Istio default)' if r['default'] else ''}"
    )
    for key in ("fault", "mirror", "rewrite", "redirect", "directResponse", "headers"):
        if res.get(key):
            lines.append(f"  {key}: {res[key]}")
    return "\n".join(lines) + "\n"
