"""``diktyo explain``: which VirtualService rule, destination and policies apply to a request."""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "explain",
        help="show how the mesh routes a request (matched rule, destination, timeout, retries)",
        description=(
            "Run the sidecar's real route matcher over the config and explain a request: which "
            "VirtualService rule matched (and why earlier rules did not), destination host, "
            "subset and port, endpoints, timeout, retries, fault and mirror. Example: "
            "diktyo explain --config ./mesh GET http://reviews:9080/reviews/1 -H 'end-user: jason'; "
            "on a running mesh: diktyo explain --from productpage-v1 GET http://reviews:9080/reviews/1"
        ),
    )
    p.add_argument("method", metavar="METHOD", help="HTTP method, e.g. GET")
    p.add_argument("url", metavar="URL", help="request URL, e.g. http://reviews:9080/x")
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--config",
        metavar="DIR",
        default=None,
        help="directory of Istio YAML (default: current directory)",
    )
    src.add_argument("--snapshot", metavar="FILE", help="a sidecar snapshot JSON file instead")
    src.add_argument(
        "--from",
        dest="from_workload",
        metavar="WORKLOAD",
        help="use the snapshot the running mesh's control plane sends this workload's sidecar "
        "(a replica like productpage-v1-1, a workload or an app name)",
    )
    p.add_argument(
        "--control-plane",
        metavar="URL",
        help="control plane URL for --from (default: $DIKTYO_CONTROL_PLANE or the mesh started "
        "by 'diktyo up')",
    )
    p.add_argument(
        "-H",
        "--header",
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help="request header (repeatable)",
    )
    p.add_argument("-o", "--output", choices=["text", "json"], default="text")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from diktyo.proxy.router.simulate import format_text, simulate

    headers: dict[str, str] = {}
    for h in args.header:
        if ":" not in h:
            print(f"diktyo explain: bad header {h!r}: use 'name: value'", file=sys.stderr)
            return 2
        k, v = h.split(":", 1)
        headers[k.strip()] = v.strip()
    try:
        if args.from_workload:
            snap = _snapshot_from_mesh(args)
            if snap is None:
                return 1
        elif args.snapshot:
            from pathlib import Path

            from diktyo.snapshot.codec import decode

            snap = decode(Path(args.snapshot).read_bytes())
        else:
            from diktyo.control.standalone import snapshot_from_dir

            snap = snapshot_from_dir(args.config or ".")
    except Exception as exc:  # noqa: BLE001 - config errors are shown to the user
        print(f"diktyo explain: cannot load config: {exc}", file=sys.stderr)
        return 1
    res = simulate(snap, args.method.upper(), args.url, headers)
    if args.output == "json":
        print(json.dumps(res, indent=2, default=str))
    else:
        sys.stdout.write(format_text(res))
    return 0 if res["rule"] is not None else 3


def _snapshot_from_mesh(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """The snapshot a running sidecar was sent, fetched from the control plane."""
    from diktyo.cli._common import call, cp_url
    from diktyo.cli.proxy_config import resolve
    from diktyo.snapshot.codec import from_builtins

    url = cp_url(args)
    if url is None:
        return None
    try:
        _, listing = call("GET", url + "/v1/proxies")
        node = resolve(args.from_workload, listing["proxies"])
        if node is None:
            names = ", ".join(n["node"].split(".")[0] for n in listing["proxies"]) or "none"
            print(
                f"diktyo explain: no sidecar named {args.from_workload!r}; known: {names}",
                file=sys.stderr,
            )
            return None
        status, body = call("GET", f"{url}/v1/proxies/{node}/snapshot")
    except ConnectionError as exc:
        print(f"diktyo explain: {exc}", file=sys.stderr)
        return None
    if status != 200 or not isinstance(body, dict):
        print(f"diktyo explain: control plane answered {status}: {body}", file=sys.stderr)
        return None
    return from_builtins(body)
