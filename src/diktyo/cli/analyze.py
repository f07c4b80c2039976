"""``diktyo analyze``: check Istio YAML offline, like ``istioctl analyze --use-kube=false``."""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
from pathlib import Path

# istioctl's exit codes (sysexits-style): 65 = some input could not be parsed,
# 79 = the analyzers found issues at or above --failure-threshold
EXIT_OK = 0
EXIT_UNKNOWN = 1
EXIT_DATA_ERROR = 65
EXIT_FOUND_ISSUES = 79
_LEVELS = ("Info", "Warning", "Error")


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "analyze",
        help="check Istio YAML files for errors (offline, like istioctl analyze)",
        description=(
            "Load Istio YAML (the networking and security kinds, and Kubernetes Services) and "
            "report what istioctl analyze reports, with Istio's message codes and levels: "
            "schema errors (IST0106), references to hosts, subsets and gateways that do not "
            "exist (IST0101), VirtualServices in conflict on a mesh host (IST0109), "
            "DestinationRule TLS without CA certificates (IST0128, IST0129), hosts missing "
            "from a bound Gateway (IST0132), conflicting Gateways (IST0145), ServiceEntry "
            "addresses (IST0134), Sidecar selector conflicts (IST0110, IST0111), deprecated "
            "fields (IST0002) and more (-L lists them all). Checks Istio does not have carry "
            "a DKT code. Each message is printed as "
            "LEVEL [CODE] (KIND NAMESPACE/NAME FILE:LINE:COL) MESSAGE (hint: HINT). "
            "Exit status (as istioctl): 0 when no message reaches --failure-threshold, "
            "79 when one does, 65 when a file cannot be read or parsed and nothing else "
            "failed, 1 for a path that does not exist. As with istioctl, -o json and -o yaml "
            "always exit 0 unless a path is missing."
        ),
        epilog=(
            "Hosts are checked against the ServiceEntries and Kubernetes Services in the "
            "input, plus --host names and --bookinfo; without any of these, host checks are "
            "skipped. Example: diktyo analyze "
            "samples/bookinfo/networking/virtual-service-all-v1.yaml "
            "samples/bookinfo/networking/destination-rule-all.yaml --bookinfo. "
            "Message reference: https://istio.io/latest/docs/reference/config/analysis/ "
            "and docs/analyze.md."
        ),
    )
    p.add_argument(
        "paths", nargs="*", metavar="PATH", help="YAML files or directories (*.yaml, *.yml)"
    )
    p.add_argument(
        "-o",
        "--output",
        choices=("log", "text", "json", "yaml"),
        default="log",
        help="output format: log (one line per message, istioctl's default; 'text' is the "
        "same), json or yaml (istioctl's fields plus file, line, column, field and hint)",
    )
    p.add_argument(
        "--failure-threshold",
        choices=_LEVELS,
        default="Error",
        help="the level at which messages make the exit status 79 (default: Error)",
    )
    p.add_argument(
        "--output-threshold",
        choices=_LEVELS,
        default="Info",
        help="the lowest level of message to print (default: Info)",
    )
    p.add_argument(
        "-S",
        "--suppress",
        action="append",
        default=[],
        metavar="CODE=RESOURCE",
        help="drop a message code on a resource, e.g. 'IST0134=ServiceEntry default/ext' or "
        "'IST0118=Service *' ('*' matches any part; istioctl's 'Kind name.namespace' works "
        "too); repeatable",
    )
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also show the loader's notes (DKT0002 at level Info), e.g. Kubernetes objects "
        "other than Services that diktyo ignores",
    )
    p.add_argument(
        "-L",
        "--list-analyzers",
        action="store_true",
        help="list the message codes diktyo reports, with level and description, and exit",
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


def _suppressed(f: object, rules: list[tuple[str, str]]) -> bool:
    code = getattr(f, "code", "")
    kind = getattr(f, "kind", "")
    ns = getattr(f, "namespace", "")
    name = getattr(f, "resource", "")
    forms = (f"{kind} {ns}/{name}", f"{kind} {name}.{ns}")
    for rc, pattern in rules:
        if rc != code:
            continue
        if any(fnmatch.fnmatchcase(form, pattern) for form in forms):
            return True
    return False


def run(args: argparse.Namespace) -> int:
    from diktyo.api import load_paths
    from diktyo.control.model import Registry
    from diktyo.control.validate import (
        BOOKINFO_HOSTS,
        CATALOGUE,
        analyze,
        from_load_error,
        registry_for_hosts,
    )
    from diktyo.control.validate.messages import is_parse_error
    from diktyo.control.validate.origin import origin_of

    if args.list_analyzers:
        for mt in CATALOGUE:
            print(f"{mt.code} {mt.level:<7} {mt.name}: {mt.description}")
        return EXIT_OK
    if not args.paths:
        print("Error: no PATH given (YAML files or directories to analyze)", file=sys.stderr)
        return EXIT_UNKNOWN
    missing = [p for p in args.paths if not Path(p).exists()]
    if missing:
        for p in missing:
            print(f"Error: stat {p}: no such file or directory", file=sys.stderr)
        return EXIT_UNKNOWN
    rules: list[tuple[str, str]] = []
    for s in args.suppress:
        code, sep, pattern = s.partition("=")
        if not sep:
            print(
                f"Error: {s} is not a valid suppression value (want CODE=RESOURCE)",
                file=sys.stderr,
            )
            return EXIT_UNKNOWN
        if all(mt.code != code for mt in CATALOGUE):
            print(
                f"Warning: Supplied message code '{code}' is an unknown message code and will "
                "not have any effect.",
                file=sys.stderr,
            )
        rules.append((code, pattern))

    result = load_paths(args.paths)
    hosts = list(args.host) + (list(BOOKINFO_HOSTS) if args.bookinfo else [])
    registry: Registry | None = registry_for_hosts(hosts) if hosts else None
    parse_errors = [e for e in result.errors if is_parse_error(e)]
    found = [
        from_load_error(e, None if is_parse_error(e) else origin_of(e.file, e.line))
        for e in result.errors
        if args.verbose or e.severity != "info"
    ]
    found += analyze(result.resources, registry)
    found = [f for f in found if not _suppressed(f, rules)]
    if not args.verbose:
        found = [f for f in found if not (f.code == "DKT0002" and f.level == "Info")]
    found.sort(key=lambda e: (e.file, e.line, e.col, e.code))

    rank = {lv: i for i, lv in enumerate(_LEVELS)}
    shown = [f for f in found if rank[f.level] >= rank[args.output_threshold]]
    failing = [
        f for f in found if rank[f.level] >= rank[args.failure_threshold] and f.code != "DKT0001"
    ]
    if args.output == "json":
        json.dump([f.to_json() for f in shown], sys.stdout, indent=2)
        sys.stdout.write("\n")
        return EXIT_OK
    if args.output == "yaml":
        from ruamel.yaml import YAML

        yaml = YAML(typ="safe", pure=True)
        yaml.default_flow_style = False
        yaml.dump([f.to_json() for f in shown], sys.stdout)
        return EXIT_OK
    for f in shown:
        print(f)
    files = len({r.file for r in result.resources})
    counts = {lv: sum(1 for f in found if f.level == lv) for lv in _LEVELS}
    if not shown:
        note = f" (but {len(parse_errors)} file(s) could not be parsed)" if parse_errors else ""
        print(
            f"\u2714 No validation issues found when analyzing {len(result.resources)} "
            f"resource(s) from {files} file(s){note}.",
            file=sys.stderr,
        )
    else:
        print(
            f"{counts['Error']} error(s), {counts['Warning']} warning(s), {counts['Info']} "
            "info message(s).",
            file=sys.stderr,
        )
    if failing:
        print(
            "Error: Analyzers found issues. See "
            "https://istio.io/latest/docs/reference/config/analysis for Istio's messages and "
            "docs/analyze.md for diktyo's.",
            file=sys.stderr,
        )
        return EXIT_FOUND_ISSUES
    if parse_errors:
        return EXIT_DATA_ERROR
    return EXIT_OK
