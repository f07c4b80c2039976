"""Parsing limits for untrusted YAML and JSON: size, nesting depth, node count, alias expansion.

Theory of operation
-------------------
Config reaches diktyo from files, ``diktyo apply`` (``POST /v1/config``), the registry API and
``diktyo sidecar --config``. Left alone, ruamel.yaml and the JSON decoders fail on hostile
input in three ways:

- *alias expansion* ("billion laughs"): a 901-byte document whose anchors refer to anchors
  expands to ~10^9 nodes when it is walked (``_to_builtins``, pydantic), growing memory until
  the process dies;
- *deep nesting*: the composer, the constructors and ``json.loads`` recurse once per level,
  so ``[[[[...`` raises ``RecursionError`` (and ruamel's scanner is quadratic in flow depth);
- *size*: a huge body is parsed in full before anything looks at it.

``check_yaml`` walks ruamel's *event* stream (no nodes built, no recursion) before a document
is composed and stops at the first event that breaks a limit, so a bomb is refused after
reading a few hundred bytes, with memory flat. Each anchor records how many nodes its subtree
expands to (aliases inside included) and how deep it goes; an alias adds that size, so
expansion is counted without expanding anything. ``check_json`` bounds depth with a scan of
the bracket bytes outside strings before ``json``/``msgspec`` decode. A violation raises
``ParseLimitError`` carrying the line and column (1-based) and the name of the limit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

__all__ = [
    "DEFAULT_LIMITS",
    "ParseLimitError",
    "ParseLimits",
    "check_json",
    "check_size",
    "check_yaml",
    "decode_json",
]


@dataclass(frozen=True, slots=True)
class ParseLimits:
    """Bounds on one input. The defaults leave room for 10,000 VirtualServices in one file."""

    max_bytes: int = 16 * 1024 * 1024  # a document / file / request body
    max_depth: int = 100  # nesting of mappings and sequences (Istio config needs ~15)
    max_nodes: int = 2_000_000  # scalars + collections of one document, aliases expanded
    max_alias_nodes: int = 100_000  # nodes that alias expansion adds to one document


DEFAULT_LIMITS = ParseLimits()


class ParseLimitError(ValueError):
    """An input that breaks a parsing limit; ``line``/``col`` are 1-based."""

    def __init__(self, limit: str, value: int, line: int, col: int, message: str) -> None:
        super().__init__(message)
        self.limit = limit  # the ParseLimits field, e.g. "max_depth"
        self.value = value  # that limit's value
        self.line = line
        self.col = col
        self.message = message

    @property
    def hint(self) -> str:
        return {
            "max_alias_nodes": "YAML anchors/aliases must not expand into huge trees "
            "(a 'billion laughs' document); write the repeated parts out or drop the aliases",
            "max_nodes": "split the config into several files or documents",
            "max_depth": "Istio config nests a few levels deep; check for runaway '[' or '{'",
            "max_bytes": "split the config into several files",
        }.get(self.limit, "")


def check_size(size: int, limits: ParseLimits = DEFAULT_LIMITS) -> None:
    if size > limits.max_bytes:
        raise ParseLimitError(
            "max_bytes",
            limits.max_bytes,
            1,
            1,
            f"document is {size} bytes, over the limit of {limits.max_bytes} bytes (max_bytes)",
        )


_COLLECTION_START = ("MappingStartEvent", "SequenceStartEvent")
_COLLECTION_END = ("MappingEndEvent", "SequenceEndEvent")


def check_yaml(text: str, limits: ParseLimits = DEFAULT_LIMITS, line_offset: int = 0) -> None:
    """Raise ``ParseLimitError`` if ``text`` (one or more YAML documents) breaks a limit.

    Syntax errors are left to the real load (which reports them with positions): the scan
    stops quietly at the first one. ``line_offset`` shifts reported lines (a document that
    starts further down a file).
    """
    check_size(len(text.encode("utf-8", "surrogatepass")), limits)
    if _cannot_break(text, limits):
        return
    _check_flow_depth(text, limits, line_offset)
    # per open collection: [expanded node count, max relative depth below it, anchor]
    stack: list[list[Any]] = []
    anchors: dict[str, tuple[int, int]] = {}  # anchor -> (expanded nodes, depth of its subtree)
    nodes = 0
    alias_nodes = 0
    yaml = YAML(typ="rt")
    try:
        for ev in yaml.parse(text):
            name = type(ev).__name__
            if name == "DocumentStartEvent":
                stack.clear()
                anchors.clear()
                nodes = alias_nodes = 0
                continue
            if name in _COLLECTION_START:
                nodes += 1
                if len(stack) + 1 > limits.max_depth:
                    raise _error(ev, line_offset, "max_depth", limits.max_depth, limits)
                stack.append([1, 1, getattr(ev, "anchor", None)])
            elif name in _COLLECTION_END:
                size, depth, anchor = stack.pop()
                if anchor:
                    anchors[anchor] = (size, depth)
                if stack:
                    stack[-1][0] += size
                    stack[-1][1] = max(stack[-1][1], depth + 1)
            elif name == "ScalarEvent":
                nodes += 1
                if ev.anchor:
                    anchors[ev.anchor] = (1, 0)
                if stack:
                    stack[-1][0] += 1
            elif name == "AliasEvent":
                size, depth = anchors.get(ev.anchor, (1, 0))
                nodes += size
                alias_nodes += size
                if alias_nodes > limits.max_alias_nodes:
                    raise _error(ev, line_offset, "max_alias_nodes", limits.max_alias_nodes, limits)
                if len(stack) + depth > limits.max_depth:
                    raise _error(ev, line_offset, "max_depth", limits.max_depth, limits)
                if stack:
                    stack[-1][0] += size
                    stack[-1][1] = max(stack[-1][1], depth + 1)
            else:
                continue
            if nodes > limits.max_nodes:
                raise _error(ev, line_offset, "max_nodes", limits.max_nodes, limits)
    except YAMLError:
        return  # a syntax error: the loader reports it with its position
    except RecursionError:  # pragma: no cover - the event parser does not recurse
        raise ParseLimitError(
            "max_depth", limits.max_depth, line_offset + 1, 1, "document nests too deeply"
        ) from None


def _error(
    ev: Any, line_offset: int, limit: str, value: int, limits: ParseLimits
) -> ParseLimitError:
    mark = ev.start_mark
    line, col = mark.line + line_offset + 1, mark.column + 1
    what = {
        "max_depth": f"nesting deeper than {value} levels",
        "max_nodes": f"more than {value} nodes in one document",
        "max_alias_nodes": f"aliases expand to more than {value} nodes",
    }[limit]
    return ParseLimitError(limit, value, line, col, f"{what} ({limit}={value})")


# --------------------------------------------------------------------------- JSON

_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = re.compile(rb"[\[\]{}]")


def check_json(raw: bytes, limits: ParseLimits = DEFAULT_LIMITS) -> None:
    """Raise ``ParseLimitError`` if a JSON body is too large or nests too deeply."""
    check_size(len(raw), limits)
    if raw.count(b"[") + raw.count(b"{") <= limits.max_depth:
        return  # cannot nest deeper than the brackets it has
    depth = 0
    pos = 0
    for m in _scan(raw):
        c = m.group()
        if c in (b"[", b"{"):
            depth += 1
            if depth > limits.max_depth:
                pos = m.start()
                line = raw.count(b"\n", 0, pos) + 1
                col = pos - (raw.rfind(b"\n", 0, pos) + 1) + 1
                raise ParseLimitError(
                    "max_depth",
                    limits.max_depth,
                    line,
                    col,
                    f"JSON nests deeper than {limits.max_depth} levels (max_depth={limits.max_depth})",
                )
        else:
            depth -= 1


def _scan(raw: bytes) -> Any:
    """Brackets outside JSON strings, in order."""
    start = 0
    for s in _JSON_STRING.finditer(raw):
        yield from _BRACKETS.finditer(raw, start, s.start())
        start = s.end()
    yield from _BRACKETS.finditer(raw, start)


def decode_json(raw: bytes, typ: Any = None, limits: ParseLimits = DEFAULT_LIMITS) -> Any:
    """``msgspec.json.decode`` after ``check_json`` (``ParseLimitError`` first, then msgspec's)."""
    import msgspec

    check_json(raw, limits)
    if typ is None:
        return msgspec.json.decode(raw)
    return msgspec.json.decode(raw, type=typ, strict=False)


_INDENT = re.compile(r"^[ \t]*(?:[-?][ \t]+)*", re.MULTILINE)


def _cannot_break(text: str, limits: ParseLimits) -> bool:
    """A cheap proof that ``text`` is within the node, alias and depth limits (then the event
    scan is skipped): no alias, fewer characters than ``max_nodes``, and an upper bound on
    nesting (every two block levels take one more column of indentation or one more ``- ``/
    ``? ``; every flow level takes a bracket) within ``max_depth``."""
    if "*" in text or len(text) > limits.max_nodes:
        return False
    brackets = text.count("[") + text.count("{")
    if brackets > limits.max_depth:
        return False
    widest = max((len(m) for m in _INDENT.findall(text)), default=0)
    return 2 * (widest + 1) + brackets <= limits.max_depth


# quoted scalars and comments, blanked (same length) before counting flow brackets
_YAML_SKIP = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"\\]|\\.)*\"|(?:(?<=\s)|^)#[^\n]*", re.MULTILINE)
_FLOW = re.compile(r"[\[\]{}]")


def _check_flow_depth(text: str, limits: ParseLimits, line_offset: int) -> None:
    """Refuse ``[[[[...`` / ``{a: {a: ...`` before ruamel sees it: its scanner spends ~0.1 ms
    per bracket of a deep flow collection before the first event, so a 16 MB one would hold a
    worker for half an hour. Brackets in quotes and comments do not count."""
    if text.count("[") + text.count("{") <= limits.max_depth:
        return
    blank = _YAML_SKIP.sub(lambda m: " " * len(m.group()), text)
    depth = 0
    for m in _FLOW.finditer(blank):
        if m.group() in "[{":
            depth += 1
            if depth > limits.max_depth:
                pos = m.start()
                line = text.count("\n", 0, pos) + line_offset + 1
                col = pos - (text.rfind("\n", 0, pos) + 1) + 1
                raise ParseLimitError(
                    "max_depth",
                    limits.max_depth,
                    line,
                    col,
                    f"nesting deeper than {limits.max_depth} levels (max_depth={limits.max_depth})",
                )
        elif depth > 0:
            depth -= 1
