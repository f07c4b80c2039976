"""``diktyo apply -f FILE|DIR``: send Istio YAML to the running control plane (like kubectl apply)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from diktyo.cli._common import add_cp_arg, call, cp_url

STDIN = Path("-")


def yaml_files(paths: list[str]) -> list[Path] | str:
    files: list[Path] = []
    for p in paths:
        if p == "-":  # like kubectl apply -f -: YAML from standard input
            files.append(STDIN)
            continue
        path = Path(p)
        if path.is_dir():
            files += sorted(
                f for f in path.rglob("*") if f.suffix in (".yaml", ".yml") and f.is_file()
            )
        elif path.is_file():
            files.append(path)
        else:
            return f"{p}: no such file or folder"
    return files


def send(args: argparse.Namespace, method: str) -> int:
    url = cp_url(args)
    if url is None:
        return 1
    files = yaml_files(args.file)
    if isinstance(files, str):
        print(f"error: {files}", file=sys.stderr)
        return 2
    code = 0
    verb = "applied" if method == "POST" else "deleted"
    for f in files:
        from urllib.parse import quote

        try:
            data = sys.stdin.buffer.read() if f == STDIN else f.read_bytes()
            source = "<stdin>" if f == STDIN else str(f)
            status, body = call(method, f"{url}/v1/config?source={quote(source)}", data)
        except ConnectionError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        if not isinstance(body, dict):
            print(f"error: {f}: unexpected answer {status}: {body}", file=sys.stderr)
            code = 1
            continue
        for kind, ns, name in body.get(verb, []):
            print(f"{kind.lower()}/{name} ({ns}) {verb}")
        for err in body.get("errors", []):
            print(err, file=sys.stderr)
        for msg in body.get("messages", []):
            print(msg, file=sys.stderr)
        if status >= 400:
            code = 1
            if method == "POST":
                print(f"error: {f} rejected; the mesh keeps its last good config", file=sys.stderr)
    return code


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "apply",
        help="apply Istio YAML to the running mesh",
        description="Send VirtualService, DestinationRule, Gateway, ... YAML to the control plane. A file with errors is rejected whole (errors as FILE:LINE:COL) and the mesh keeps its last good config.",
    )
    p.add_argument(
        "-f",
        "--file",
        action="append",
        required=True,
        metavar="FILE|DIR",
        help="YAML file, folder, or - for standard input (repeatable)",
    )
    add_cp_arg(p)
    p.set_defaults(func=lambda a: send(a, "POST"))
