"""Origin: which resource (kind, namespace, name) a load error's line belongs to.

Load errors carry a file position only (the document did not load); istioctl names the
resource in every message, so ``diktyo analyze`` reads the kind and metadata of the YAML
document around the error's line to do the same. Anything unreadable gives no origin.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

from ruamel.yaml import YAML

_SEP = re.compile(r"^(---|\.\.\.)(\s|$)")
_MAX_DOC = 1 << 20  # documents larger than this are not re-read for an origin


@lru_cache(maxsize=64)
def _documents(path: str) -> tuple[tuple[int, int, str], ...]:
    """(first line, last line, text) of every ``---`` document of ``path`` (1-based lines)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines(keepends=True)
    except (OSError, UnicodeDecodeError):
        return ()
    docs: list[tuple[int, int, str]] = []
    start = 0
    for i, line in enumerate([*lines, "---\n"]):
        if _SEP.match(line):
            if i > start:
                docs.append((start + 1, i, "".join(lines[start:i])))
            start = i + 1
    return tuple(docs)


def origin_of(path: str, line: int) -> tuple[str, str, str] | None:
    """``(kind, namespace, name)`` of the document of ``path`` holding ``line``, or None."""
    for first, last, text in _documents(path):
        if not first <= line <= last:
            continue
        if len(text) > _MAX_DOC:
            return None
        try:
            data: Any = YAML(typ="safe", pure=True).load(text)
        except Exception:  # noqa: BLE001 - broken YAML has no origin, the error says why
            return None
        if not isinstance(data, dict):
            return None
        kind, meta = data.get("kind"), data.get("metadata")
        if not isinstance(kind, str) or kind == "List" or not isinstance(meta, dict):
            return None
        name, ns = meta.get("name"), meta.get("namespace") or "default"
        if not isinstance(name, str) or not name or not isinstance(ns, str):
            return None
        return kind, ns, name
    return None
