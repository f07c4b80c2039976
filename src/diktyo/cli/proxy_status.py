"""``diktyo proxy-status``: is every sidecar in sync with the control plane (SYNCED / STALE / NACK)?"""

from __future__ import annotations

import argparse
import json
import sys

from diktyo.cli._common import add_cp_arg, call, cp_url, table


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "proxy-status",
        help="sync state of every sidecar (like istioctl proxy-status)",
        description="Per sidecar: the newest config version, the version it acknowledged, and SYNCED, STALE (not acknowledged yet), NACK (rejected; with the reason) or NOT CONNECTED.",
    )
    p.add_argument("-o", "--output", choices=["table", "json"], default="table")
    add_cp_arg(p)
    p.set_defaults(func=run)


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
    rows = []
    for p in body["proxies"]:
        state = p["state"]
        if state == "NACK":
            state = f"NACK ({p['error']})"
        if p.get("translate_error"):
            state += f" [translate error: {p['translate_error']}]"
        rows.append([p["node"], p["mode"], p["version"] or "-", p["acked"] or "-", state])
    print(table(rows, ["NAME", "TYPE", "VERSION", "ACKED", "STATUS"]))
    return 0 if all(p["state"] == "SYNCED" for p in body["proxies"]) else 4
