"""RFC 6902 JSON Patch between two JSON values (what the admission webhook returns)."""

from __future__ import annotations

from typing import Any


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def json_patch(original: Any, mutated: Any) -> list[dict[str, Any]]:
    """Operations that turn ``original`` into ``mutated`` (applied in order).

    Dicts are diffed key by key; lists keep their common head and tail and diff or
    add/remove the middle; everything else is replaced. ``[]`` when equal.
    """
    ops: list[dict[str, Any]] = []
    _diff(original, mutated, "", ops)
    return ops


def _diff(a: Any, b: Any, path: str, ops: list[dict[str, Any]]) -> None:
    if type(a) is type(b) and a == b:
        return
    if isinstance(a, dict) and isinstance(b, dict):
        for key in a:
            if key not in b:
                ops.append({"op": "remove", "path": f"{path}/{_escape(str(key))}"})
        for key, value in b.items():
            sub = f"{path}/{_escape(str(key))}"
            if key in a:
                _diff(a[key], value, sub, ops)
            else:
                ops.append({"op": "add", "path": sub, "value": value})
        return
    if isinstance(a, list) and isinstance(b, list):
        head = 0
        while head < len(a) and head < len(b) and _same(a[head], b[head]):
            head += 1
        tail = 0
        while (tail < len(a) - head and tail < len(b) - head
               and _same(a[len(a) - 1 - tail], b[len(b) - 1 - tail])):
            tail += 1
        mid_a, mid_b = a[head:len(a) - tail], b[head:len(b) - tail]
        if mid_a and len(mid_b) > len(mid_a):  # pure insertion around kept items?
            n = len(mid_a)
            for k in range(len(mid_b) - n + 1):
                if all(_same(x, y) for x, y in zip(mid_b[k:k + n], mid_a, strict=False)):
                    for j, item in enumerate(mid_b[:k]):
                        ops.append({"op": "add", "path": f"{path}/{head + j}", "value": item})
                    for j, item in enumerate(mid_b[k + n:]):
                        where = "-" if tail == 0 else str(head + k + n + j)
                        ops.append({"op": "add", "path": f"{path}/{where}", "value": item})
                    return
        common = min(len(mid_a), len(mid_b))
        for i in range(common):
            _diff(mid_a[i], mid_b[i], f"{path}/{head + i}", ops)
        for i in range(len(mid_a) - 1, common - 1, -1):
            ops.append({"op": "remove", "path": f"{path}/{head + i}"})
        for i in range(common, len(mid_b)):
            # the list is now a[:head] + mid_b[:i] + a[len(a) - tail:]; "-" appends
            where = "-" if tail == 0 else str(head + i)
            ops.append({"op": "add", "path": f"{path}/{where}", "value": mid_b[i]})
        return
    ops.append({"op": "replace", "path": path, "value": b})


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b
