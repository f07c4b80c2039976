"""A small parser for the Prometheus text format 0.0.4 (what sidecars' /stats/prometheus serve).

Pure and tolerant: a malformed line is skipped and counted, never raised, because the text
comes from another process.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


@dataclass(slots=True)
class ParseResult:
    samples: list[Sample] = field(default_factory=list)
    types: dict[str, str] = field(default_factory=dict)
    bad_lines: int = 0


_ESCAPES = {"\\": "\\", '"': '"', "n": "\n"}


def _parse_labels(s: str, i: int) -> tuple[dict[str, str], int]:
    """Parse ``{a="x",b="y"}`` starting at s[i] == "{"; returns labels and the index after "}"."""
    labels: dict[str, str] = {}
    i += 1
    n = len(s)
    while True:
        while i < n and s[i] in " ,":
            i += 1
        if i >= n:
            raise ValueError("unterminated label set")
        if s[i] == "}":
            return labels, i + 1
        j = s.index("=", i)
        name = s[i:j].strip()
        if not name or s[j + 1] != '"':
            raise ValueError("bad label")
        i = j + 2
        buf: list[str] = []
        while True:
            c = s[i]
            if c == "\\":
                buf.append(_ESCAPES.get(s[i + 1], "\\" + s[i + 1]))
                i += 2
            elif c == '"':
                i += 1
                break
            else:
                buf.append(c)
                i += 1
        labels[name] = "".join(buf)


def _parse_value(v: str) -> float:
    if v in ("+Inf", "Inf"):
        return math.inf
    if v == "-Inf":
        return -math.inf
    return float(v)


def parse(text: str) -> ParseResult:
    """All samples of an exposition, with ``# TYPE`` info."""
    res = ParseResult()
    for line in text.split("\n"):  # not splitlines(): \x1c-\x1e, \x85 may sit in label values
        line = line.strip(" \t\r")
        if not line:
            continue
        if line.startswith("#"):
            parts = line.split(None, 3)
            if len(parts) >= 4 and parts[1] == "TYPE":
                res.types[parts[2]] = parts[3]
            continue
        try:
            brace = line.find("{")
            space = line.find(" ")
            if brace != -1 and (space == -1 or brace < space):
                name = line[:brace]
                labels, end = _parse_labels(line, brace)
                rest = line[end:].split()
            else:
                name, *rest = line.split()
                labels = {}
            if not name or not rest:
                raise ValueError("no value")
            res.samples.append(Sample(name, labels, _parse_value(rest[0])))
        except (ValueError, IndexError):
            res.bad_lines += 1
    return res


def iter_samples(text: str, prefix: str = "") -> Iterator[Sample]:
    for s in parse(text).samples:
        if s.name.startswith(prefix):
            yield s
