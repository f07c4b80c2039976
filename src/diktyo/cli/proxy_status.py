"""``diktyo proxy-status``: is every sidecar in sync with the control plane (SYNCED / STALE / NACK)?"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from diktyo.cli._common import add_cp_arg, call, cp_url, table


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "proxy-status",
        help="sync state of every sidecar (like istioctl proxy-status)",
        description="Per sidecar: the newest config version, the version it acknowledged, and SYNCED, STALE (not acknowledged yet), NACK (rejected; with the reason) or NOT CONNECTED, and the control-plane replica it is connected to (like istioctl's ISTIOD column; 'embedded' for a single control plane). With replicas on etcd, a first line names them and the leader.",
    )
    p.add_argument("-o", "--output", choices=["table", "json"], default="table")
    add_cp_arg(p)
    p.set_defaults(func=run)


def _from_each_replica(body: dict[str, Any], replicas: list[dict[str, Any]]) -> dict[str, Any]:
    """Each sidecar's row as the replica it is connected to sees it (ACKs go to that replica
    only), like istioctl asking every istiod."""
    rows = {p["node"]: p for p in body["proxies"]}
    for r in replicas:
        wanted = [n for n, p in rows.items() if p.get("replica") == r["id"]]
        if not wanted or not r.get("url"):
            continue
        try:
            _, theirs = call("GET", r["url"] + "/v1/proxies", timeout=3.0)
        except ConnectionError:
            continue  # that replica is gone: keep the row as this one sees it
        for p in theirs.get("proxies", []) if isinstance(theirs, dict) else []:
            if p["node"] in wanted:
                rows[p["node"]] = {**p, "replica": r["id"]}
    return {**body, "proxies": [rows[n] for n in sorted(rows)]}


def run(args: argparse.Namespace) -> int:
    url = cp_url(args)
    if url is None:
        return 1
    try:
        _, body = call("GET", url + "/v1/proxies")
    except ConnectionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.output == "json":
        print(json.dumps(body, indent=2))
        return 0
    try:
        _, replicas = call("GET", url + "/v1/replicas")
    except ConnectionError:
        replicas = {}
    if isinstance(replicas, dict) and replicas.get("backend") == "etcd":
        names = ", ".join(
            r["id"] + (" (leader)" if r.get("leader") else "") for r in replicas.get("replicas", [])
        )
        away = "" if replicas.get("etcd_reachable", True) else " (etcd unreachable: no quorum?)"
        print(f"store: etcd, replicas: {names or 'none'}{away}")
        body = _from_each_replica(body, replicas.get("replicas", []))
    rows = []
    for p in body["proxies"]:
        state = p["state"]
        if state == "NACK":
            state = f"NACK ({p['error']})"
        if p.get("translate_error"):
            state += f" [translate error: {p['translate_error']}]"
        rows.append(
            [
                p["node"],
                p["mode"],
                p["version"] or "-",
                p["acked"] or "-",
                p.get("replica") or "-",
                state,
            ]
        )
    print(table(rows, ["NAME", "TYPE", "VERSION", "ACKED", "REPLICA", "STATUS"]))
    return 0 if all(p["state"] == "SYNCED" for p in body["proxies"]) else 4
