"""``diktyo proxy-config WORKLOAD routes|clusters|endpoints|listeners|telemetry``: what one
sidecar was sent."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from diktyo.cli._common import add_cp_arg, call, cp_url, table

SECTIONS = ("routes", "clusters", "endpoints", "listeners", "telemetry", "all")


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "proxy-config",
        help="show the config of one sidecar (like istioctl proxy-config)",
        description="Show the snapshot the control plane sends one sidecar. WORKLOAD is a replica name (reviews-v2-1), a node id (reviews-v2-1.default) or a workload name (its first replica).",
    )
    p.add_argument("workload", metavar="WORKLOAD")
    p.add_argument("section", choices=SECTIONS)
    p.add_argument("-o", "--output", choices=["table", "json"], default="table")
    add_cp_arg(p)
    p.set_defaults(func=run)


def resolve(name: str, nodes: list[dict[str, Any]]) -> str | None:
    ids = [str(n["node"]) for n in nodes]
    if name in ids:
        return name
    for i in ids:
        if i.split(".")[0] == name:
            return i
    for n in nodes:
        if n["workload"] == name:
            return str(n["node"])
    for i in ids:  # an app name: "reviews" -> reviews-v1-1
        if i.startswith(name + "-"):
            return i
    return None


def run(args: argparse.Namespace) -> int:
    url = cp_url(args)
    if url is None:
        return 1
    try:
        _, listing = call("GET", url + "/v1/proxies")
        node = resolve(args.workload, listing["proxies"])
        if node is None:
            names = ", ".join(n["node"].split(".")[0] for n in listing["proxies"]) or "none"
            print(f"error: no sidecar named {args.workload!r}; known: {names}", file=sys.stderr)
            return 1
        status, snap = call("GET", f"{url}/v1/proxies/{node}/snapshot")
    except ConnectionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"error: {snap.get('error') if isinstance(snap, dict) else snap}", file=sys.stderr)
        return 1
    if args.section == "all" or args.output == "json":
        part = snap if args.section == "all" else _section(snap, args.section)
        print(json.dumps(part, indent=2))
        return 0
    print(_render(snap, args.section))
    return 0


def _section(snap: dict[str, Any], section: str) -> Any:
    if section == "routes":
        return snap.get("route_tables", [])
    if section == "endpoints":
        return [
            {"cluster": c["name"], **e}
            for c in snap.get("clusters", [])
            for e in c.get("endpoints", [])
        ]
    if section == "telemetry":
        return snap.get("telemetry") or {}
    return snap.get(section, [])


def _render_telemetry(snap: dict[str, Any]) -> str:
    tel = snap.get("telemetry")
    mesh = snap.get("mesh", {})
    if not tel:
        log = "on" if mesh.get("access_log", {}).get("enabled") else "off"
        sampling = mesh.get("tracing", {}).get("sampling", 1.0)
        return f"no Telemetry applies: mesh defaults (access log {log}, sampling {sampling:g}%)"
    rows = []
    for d in ("client", "server"):
        al = tel.get(f"{d}_access_log", {})
        tr = tel.get(f"{d}_tracing", {})
        tags = ", ".join(t["name"] for t in tr.get("custom_tags", [])) or "-"
        rows.append(
            [
                d,
                "on" if al.get("enabled") else "off",
                al.get("filter") or "-",
                f"{tr.get('sampling', 1.0):g}%",
                "reported" if tr.get("span_reporting", True) else "not reported",
                tags,
            ]
        )
    out = table(rows, ["DIRECTION", "ACCESS LOG", "FILTER", "SAMPLING", "SPANS", "TAGS"])
    for ov in tel.get("metrics", []):
        what = []
        if ov.get("disabled") is not None:
            what.append("disabled" if ov["disabled"] else "enabled")
        what += [f"-{t}" for t in ov.get("remove", [])]
        what += [f"{k}={v}" for k, v in ov.get("upsert", {}).items()]
        metric = ov.get("metric", "ALL_METRICS")
        mode = ov.get("mode", "CLIENT_AND_SERVER")
        out += f"\nmetric override {metric} ({mode}): {' '.join(what) or '-'}"
    return out + "\nfrom Telemetry: " + ", ".join(tel.get("sources", []))


def _render(snap: dict[str, Any], section: str) -> str:
    if section == "telemetry":
        return _render_telemetry(snap)
    if section == "listeners":
        rows = [
            [
                str(lst.get("port", 0)),
                lst["direction"],
                lst["name"],
                lst.get("route_table") or lst.get("cluster", ""),
            ]
            for lst in snap.get("listeners", [])
        ]
        return table(rows, ["PORT", "TYPE", "NAME", "DESTINATION"])
    if section == "clusters":
        rows = [
            [
                c["name"],
                c.get("direction", "outbound"),
                str(len(c.get("endpoints", []))),
                c.get("protocol", "http"),
                c.get("upstream_protocol", "HTTP/1.1"),
            ]
            for c in snap.get("clusters", [])
        ]
        return table(rows, ["CLUSTER", "DIRECTION", "ENDPOINTS", "PROTOCOL", "UPSTREAM"])
    if section == "endpoints":
        rows = [
            [f"{e['address']}:{e['port']}", e.get("workload", ""), e["cluster"]]
            for e in _section(snap, "endpoints")
        ]
        return table(rows, ["ENDPOINT", "WORKLOAD", "CLUSTER"])
    rows = []
    for t in snap.get("route_tables", []):
        for vh in t.get("virtual_hosts", []):
            for r in vh.get("routes", []):
                matches = "; ".join(_match_text(m) for m in r.get("matches", [])) or "/*"
                dests = ", ".join(
                    f"{w['cluster']} {w.get('weight', 100)}%" for w in r.get("clusters", [])
                )
                if r.get("redirect"):
                    dests = "redirect"
                if r.get("direct_response"):
                    dests = f"direct {r['direct_response']['status']}"
                src = r.get("source", {})
                vs = src.get("name", "") or "default"
                if src.get("delegate"):
                    vs += f" via {src['delegate']}"
                rows.append([t["name"], vh["name"], matches, dests, vs])
    return table(rows, ["TABLE", "HOST", "MATCH", "DESTINATIONS", "VIRTUAL SERVICE"])


def _match_text(m: dict[str, Any]) -> str:
    parts = []
    if m.get("uri"):
        parts.append(f"{m['uri']['kind']} {m['uri'].get('value', '')}")
    for h in m.get("headers", []):
        parts.append(f"{h['name']}={h['match'].get('value', '')}")
    return " & ".join(parts) or "*"
