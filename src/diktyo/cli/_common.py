"""Helpers shared by the control-plane-facing subcommands (HTTP calls, URL lookup, tables)."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from typing import Any

from diktyo.platform.state import control_plane_url
from diktyo.security import admin_token


def add_cp_arg(parser: Any) -> None:
    parser.add_argument(
        "--control-plane",
        metavar="URL",
        help="control plane URL (default: $DIKTYO_CONTROL_PLANE or the mesh started by 'diktyo up')",
    )


def add_files_arg(parser: Any, help: str) -> None:
    """``-f/--file FILE|DIR`` (repeatable, required): the YAML of ``apply`` and ``delete``."""
    parser.add_argument(
        "-f", "--file", action="append", required=True, metavar="FILE|DIR", help=help
    )


def cp_url(args: Any) -> str | None:
    try:
        return control_plane_url(getattr(args, "control_plane", None))
    except LookupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None


def call(
    method: str,
    url: str,
    body: bytes | None = None,
    timeout: float = 10.0,
    *,
    json_body: bool = False,
) -> tuple[int, Any]:
    """HTTP call returning (status, parsed JSON or text). Raises ConnectionError with advice."""
    req = urllib.request.Request(url, data=body, method=method)
    token = admin_token.read()  # $DIKTYO_HOME/admin-token, written by up/demo/control-plane
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    if body is not None:
        req.add_header("content-type", "application/json" if json_body else "application/yaml")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ConnectionError(
            f"cannot reach the control plane at {url.split('/v1')[0]}: {reason}; is the mesh "
            "running ('diktyo status')?"
        ) from None
    try:
        parsed = json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")
    if status == 401 and isinstance(parsed, dict):
        print(f"error: {parsed.get('error', 'unauthorized')}", file=sys.stderr)
    return status, parsed


def table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)
