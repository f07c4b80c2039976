"""``diktyo analyze``: check Istio YAML offline, like ``istioctl analyze``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from diktyo.api import ConfigError, load_paths
from diktyo.control.model import Registry
from diktyo.control.validate import BOOKINFO_HOSTS, analyze, registry_for_hosts


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "analyze",
        help="check Istio YAML files for errors (offline, like istioctl analyze)",
        description=(
            "Load Istio YAML (VirtualService, DestinationRule, ServiceEntry, Gateway, Sidecar, "
            "PeerAuthentication, AuthorizationPolicy, RequestAuthentication) and report schema "
            "errors (unknown fields, wrong types, bad durations and regexes, duplicate keys) and "
            "cross-resource problems (undefined subsets, weights not adding up to 100, rules "
            "shadowed by an earlier catch-all, conflicting DestinationRules, rewrite with "
            "redirect). Each problem is printed as FILE:LINE:COL: error|warning: FIELD: MESSAGE. "
            "Exit status: 0 when there are no errors (warnings alone are fine), 1 otherwise."
        ),
        epilog=(
            "Hosts are checked against the ServiceEntries in the input, plus --host names and "
            "--bookinfo; without any of these, host checks are skipped. "
            "Example: diktyo analyze samples/bookinfo/networking/virtual-service-all-v1.yaml "
            "samples/bookinfo/networking/destination-rule-all.yaml --bookinfo"
        ),
    )
    p.add_argument(
        "paths", nargs="+", metavar="PATH", help="YAML files or directories (*.yaml, *.yml)"
    )
    p.add_argument("-o", "--output", choices=("text", "json"), default="text", help="output format")
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also show notes (severity info), e.g. Kubernetes objects other than Services "
        "that diktyo ignores",
    )
    p.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="NAME",
        help="a service that exists (short name in namespace default, or FQDN); repeatable",
    )
    p.add_argument(
        "--bookinfo",
        action="store_true",
        help="treat the Bookinfo services (productpage, reviews, ratings, details) as existing",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    missing = [p for p in args.paths if not Path(p).exists()]
    result = load_paths(args.paths)
    hosts = list(args.host) + (list(BOOKINFO_HOSTS) if args.bookinfo else [])
    registry: Registry | None = registry_for_hosts(hosts) if hosts else None
    problems: list[ConfigError] = list(result.errors) + analyze(result.resources, registry)
    if not args.verbose:
        problems = [e for e in problems if e.severity != "info"]
    problems.sort(key=lambda e: (e.file, e.line, e.col))
    errors = sum(1 for e in problems if e.severity == "error")
    warnings = sum(1 for e in problems if e.severity == "warning")
    if args.output == "json":
        json.dump([e.to_json() for e in problems], sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        for e in problems:
            print(e)
        files = len({r.file for r in result.resources})
        if not problems:
            print(
                f"No validation issues found in {len(result.resources)} resource(s) "
                f"from {files} file(s).",
                file=sys.stderr,
            )
        else:
            print(f"{errors} error(s), {warnings} warning(s).", file=sys.stderr)
        if missing:
            print("Paths not found: " + ", ".join(missing), file=sys.stderr)
    return 1 if errors else 0
