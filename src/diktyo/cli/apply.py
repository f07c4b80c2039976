"""``diktyo apply -f FILE|DIR``: send Istio YAML to the running control plane (like kubectl apply)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

from diktyo.cli._common import add_cp_arg, add_files_arg, call, cp_url

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


def _read(f: Path) -> tuple[str, bytes]:
    if f == STDIN:
        return "<stdin>", sys.stdin.buffer.read()
    return str(f), f.read_bytes()


def _report(body: dict[str, Any], verb: str) -> None:
    for kind, ns, name in body.get(verb, []):
        print(f"{kind.lower()}/{name} ({ns}) {verb}")
    for err in body.get("errors", []):
        print(err, file=sys.stderr)
    for msg in body.get("messages", []):
        print(msg, file=sys.stderr)


def add_wait_arg(p: argparse.ArgumentParser, verb: str) -> None:
    p.add_argument(
        "--wait",
        nargs="?",
        const=30.0,
        type=float,
        metavar="SECONDS",
        help=f"return once every sidecar has {verb} the change (ACKed the snapshot that has "
        "it), like 'istioctl experimental wait --for=distribution'; exit 1 naming the "
        "sidecars that did not within SECONDS (default 30)",
    )


def _query(args: argparse.Namespace) -> str:
    wait = getattr(args, "wait", None)
    return "" if wait is None else f"wait={wait:g}"


def _distribution(body: dict[str, Any], wait: float | None) -> int:
    """Print where the change reached; 1 if some sidecar did not ACK it in time."""
    dist = body.get("distribution")
    if wait is None or not isinstance(dist, dict):
        return 0
    synced, late = dist.get("synced", []), dist.get("late", [])
    total = len(synced) + len(late)
    if not late:
        print(f"distributed to {total} of {total} sidecars (push version {dist.get('version')})")
        return 0
    names = ", ".join(
        f"{x['node']} ({x['state']}{': ' + x['error'] if x.get('error') else ''})" for x in late
    )
    print(
        f"error: distributed to {len(synced)} of {total} sidecars within {wait:g}s; not to: "
        f"{names}. 'diktyo proxy-status' shows them; a NACK's reason is in the sidecar's log",
        file=sys.stderr,
    )
    return 1


def _target(args: argparse.Namespace) -> tuple[str, list[Path]] | int:
    """The control plane's URL and the YAML files to send, or the exit code saying why not."""
    url = cp_url(args)
    if url is None:
        return 1
    files = yaml_files(args.file)
    if isinstance(files, str):
        print(f"error: {files}", file=sys.stderr)
        return 2
    return url, files


def apply(args: argparse.Namespace) -> int:
    """All files in one request: the control plane applies them together or not at all."""
    target = _target(args)
    if isinstance(target, int):
        return target
    url, files = target
    payload = []
    for f in files:
        source, data = _read(f)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            print(f"error: {source} is not UTF-8 text; save it as UTF-8", file=sys.stderr)
            return 2
        payload.append({"source": source, "text": text})
    try:
        query = _query(args)
        status, body = call(
            "POST",
            f"{url}/v1/config" + (f"?{query}" if query else ""),
            json.dumps({"files": payload}).encode(),
            # a large config takes a while to load and analyze
            timeout=300.0 + (args.wait or 0.0),
            json_body=True,
        )
    except ConnectionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not isinstance(body, dict):
        print(f"error: unexpected answer {status}: {body}", file=sys.stderr)
        return 1
    _report(body, "applied")
    if status >= 400:
        if body.get("error"):
            print(f"error: {body['error']}", file=sys.stderr)
        names = ", ".join(p["source"] for p in payload)
        print(
            f"error: {names} rejected: nothing applied; the mesh keeps its last good config",
            file=sys.stderr,
        )
        return 1
    return _distribution(body, args.wait)


def send(args: argparse.Namespace, method: str) -> int:
    """``diktyo delete``: one request per file."""
    target = _target(args)
    if isinstance(target, int):
        return target
    url, files = target
    code = 0
    verb = "applied" if method == "POST" else "deleted"
    for f in files:
        try:
            source, data = _read(f)
            query = "&".join(q for q in (f"source={quote(source)}", _query(args)) if q)
            timeout = 10.0 + (getattr(args, "wait", None) or 0.0)
            status, body = call(method, f"{url}/v1/config?{query}", data, timeout=timeout)
        except ConnectionError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        if not isinstance(body, dict):
            print(f"error: {f}: unexpected answer {status}: {body}", file=sys.stderr)
            code = 1
            continue
        _report(body, verb)
        if status >= 400 or _distribution(body, getattr(args, "wait", None)):
            code = 1
    return code


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "apply",
        help="apply Istio YAML to the running mesh",
        description="Send VirtualService, DestinationRule, Gateway, ... YAML to the control plane. All the files are applied together or not at all: a load error (FILE:LINE:COL) or an error found by analysis ('diktyo analyze': weights over 100, undefined subsets, '*' hosts, ...) rejects them, exits 1, and the mesh keeps its last good config. Warnings are printed and pass.",
    )
    add_files_arg(p, "YAML file, folder, or - for standard input (repeatable)")
    add_cp_arg(p)
    add_wait_arg(p, "applied")
    p.set_defaults(func=apply)
