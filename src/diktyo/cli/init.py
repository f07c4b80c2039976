"""``diktyo init``: print or install a pod's traffic-capture rules (Istio's ``istio-iptables``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

DESCRIPTION = (
    "Generate the nat-table rules that send a pod's (or a diktyo workload namespace's) TCP "
    "traffic through its sidecar, as Istio's istio-iptables does in the istio-init container: "
    "outbound TCP is redirected to 15001, inbound TCP to 15006, and the sidecar's own traffic "
    "(uid/gid 1337) is left alone. Without flags the settings are those Istio's injector uses "
    "for a pod without annotations (-b '*' -d 15090,15021,15020 -i '*'); --annotations reads a "
    "pod's traffic.sidecar.istio.io/* annotations. Prints the rules in iptables-restore format; "
    "--apply installs them (root or CAP_NET_ADMIN), --cleanup removes them. "
    "Details: docs/transparent.md."
)


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]  # argparse's private generic
    p = subparsers.add_parser(
        "init",
        help="print or install a pod's traffic-capture iptables rules (like istio-iptables)",
        description=DESCRIPTION,
    )
    add = p.add_argument
    add(
        "-p",
        "--envoy-port",
        dest="proxy_port",
        type=int,
        default=None,
        help="port outbound TCP is redirected to (default 15001)",
    )
    add(
        "-z",
        "--inbound-capture-port",
        type=int,
        default=None,
        help="port inbound TCP is redirected to (default 15006)",
    )
    add(
        "-e",
        "--inbound-tunnel-port",
        type=int,
        default=None,
        help="inbound port never captured (default 15008)",
    )
    add(
        "-u",
        "--proxy-uid",
        default=None,
        help="uid(s) of the sidecar, whose traffic is not captured (default 1337)",
    )
    add(
        "-g",
        "--proxy-gid",
        default=None,
        help="gid(s) of the sidecar, whose traffic is not captured (default: the uid)",
    )
    add(
        "-m",
        "--istio-inbound-interception-mode",
        dest="interception_mode",
        default=None,
        choices=["REDIRECT", "NONE"],
        help="REDIRECT (default) or NONE (no rules)",
    )
    add(
        "-b",
        "--istio-inbound-ports",
        dest="inbound_ports_include",
        default=None,
        metavar="PORTS",
        help="inbound ports to capture, comma-separated, '*' = all (default *)",
    )
    add(
        "-d",
        "--istio-local-exclude-ports",
        dest="inbound_ports_exclude",
        default=None,
        metavar="PORTS",
        help="inbound ports not captured when -b is '*' (default 15090,15021,15020)",
    )
    add(
        "-q",
        "--istio-local-outbound-ports",
        dest="outbound_ports_include",
        default=None,
        metavar="PORTS",
        help="outbound ports always captured, whatever the address",
    )
    add(
        "-o",
        "--istio-local-outbound-ports-exclude",
        dest="outbound_ports_exclude",
        default=None,
        metavar="PORTS",
        help="outbound ports never captured (TCP and UDP)",
    )
    add(
        "-i",
        "--istio-service-cidr",
        dest="outbound_ip_ranges_include",
        default=None,
        metavar="CIDRS",
        help="outbound IP ranges captured, '*' = all (default *)",
    )
    add(
        "-x",
        "--istio-service-exclude-cidr",
        dest="outbound_ip_ranges_exclude",
        default=None,
        metavar="CIDRS",
        help="outbound IP ranges never captured",
    )
    add(
        "-c",
        "--istio-exclude-interfaces",
        dest="exclude_interfaces",
        default=None,
        metavar="IFACES",
        help="interfaces whose traffic is never captured",
    )
    add(
        "--annotations",
        metavar="FILE",
        help="YAML/JSON file with pod annotations (a mapping, or a Pod / pod template whose "
        "metadata.annotations are read): traffic.sidecar.istio.io/includeInboundPorts, "
        "excludeInboundPorts (added to 15090,15021,15020), includeOutboundIPRanges, "
        "excludeOutboundIPRanges, includeOutboundPorts, excludeOutboundPorts, "
        "excludeInterfaces and sidecar.istio.io/interceptionMode; flags win over them",
    )
    add(
        "--apply",
        action="store_true",
        help="install the rules (replacing an earlier install) instead of only printing them",
    )
    add("--cleanup", action="store_true", help="remove installed rules and chains")
    add(
        "--netns",
        metavar="NAME",
        help="with --apply/--cleanup: in this named network "
        "namespace (ip netns) instead of the current one",
    )
    add(
        "--backend",
        default="auto",
        choices=["auto", "nft", "legacy", "default"],
        help="iptables backend for --apply/--cleanup (auto: nft, then legacy)",
    )
    p.set_defaults(func=run)


_FIELDS = (
    "proxy_port",
    "inbound_capture_port",
    "inbound_tunnel_port",
    "proxy_uid",
    "proxy_gid",
    "interception_mode",
    "inbound_ports_include",
    "inbound_ports_exclude",
    "outbound_ports_include",
    "outbound_ports_exclude",
    "outbound_ip_ranges_include",
    "outbound_ip_ranges_exclude",
    "exclude_interfaces",
)


def _annotations(path: str) -> dict[str, str]:
    from ruamel.yaml import YAML

    data: Any = YAML(typ="safe").load(Path(path).read_text(encoding="utf-8"))
    if data is None:  # an empty file: no annotations
        return {}
    if isinstance(data, dict) and "spec" in data and "template" in (data.get("spec") or {}):
        data = data["spec"]["template"]  # Deployment & co: the pod template
    if isinstance(data, dict) and isinstance(data.get("metadata"), dict):
        data = data["metadata"].get("annotations") or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of annotations or a Pod manifest")  # noqa: TRY004
    return {str(k): str(v) for k, v in data.items()}


def config_from_args(args: argparse.Namespace) -> Any:
    """The ``CaptureConfig`` the flags and annotations describe."""
    from dataclasses import replace

    from diktyo.platform.capture_rules import CaptureConfig, from_annotations

    cfg = CaptureConfig.injected()
    if args.annotations:
        cfg = from_annotations(_annotations(args.annotations), cfg)
    changes = {f: getattr(args, f) for f in _FIELDS if getattr(args, f) is not None}
    if "proxy_uid" in changes and "proxy_gid" not in changes:
        changes["proxy_gid"] = changes["proxy_uid"]  # istio-iptables: -g defaults to -u
    return replace(cfg, **changes).validate()


def run(args: argparse.Namespace) -> int:
    from diktyo.platform.capture_apply import CaptureApplyError, apply, find_backend, remove
    from diktyo.platform.capture_rules import CaptureConfigError, render

    try:
        cfg = config_from_args(args)
    except (CaptureConfigError, OSError, ValueError) as exc:
        print(f"diktyo init: {exc}", file=sys.stderr)
        return 2
    if not (args.apply or args.cleanup):
        sys.stdout.write(render(cfg))
        return 0
    try:
        backend = find_backend(args.backend)
        where = f"network namespace {args.netns}" if args.netns else "this network namespace"
        if args.cleanup:
            n = remove(cfg, netns=args.netns, backend=backend)
            print(
                f"removed capture rules from {where} ({n} iptables commands applied)",
                file=sys.stderr,
            )
            return 0
        text = apply(cfg, netns=args.netns, backend=backend)
    except CaptureApplyError as exc:
        print(f"diktyo init: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(text)
    print(f"installed capture rules in {where} with {backend.restore}", file=sys.stderr)
    return 0
