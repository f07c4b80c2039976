"""A small parser for the Prometheus text format 0.0.4 (what sidecars' /stats/prometheus serve).

Pure and tolerant: a malformed line is skipped and counted, never raised, because the text
comes from another process.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float
    series: str = ""  # the sample's text before its value: a cheap identity within one target


@dataclass(slots=True)
class ParseResult:
    samples: list[Sample] = field(default_factory=list)
    types: dict[str, str] = field(default_factory=dict)
    bad_lines: int = 0


_ESCAPES = {"\\": "\\", '"': '"', "n": "\n"}
_PAIR = re.compile(r'[ \t]*([a-zA-Z_][a-zA-Z0-9_]*)[ \t]*=[ \t]*"((?:[^"\\]|\\.)*)"[ \t]*,?')
_UNESCAPE = re.compile(r"\\(.)")


def _unescape(v: str) -> str:
    return _UNESCAPE.sub(lambda m: _ESCAPES.get(m.group(1), "\\" + m.group(1)), v)


def _parse_labels(s: str, i: int) -> tuple[dict[str, str], int]:
    """Parse ``{a="x",b="y"}`` starting at s[i] == "{"; returns labels and the index after "}"."""
    labels: dict[str, str] = {}
    pos = i + 1
    n = len(s)
    while True:
        while pos < n and s[pos] in " \t":
            pos += 1
        if pos >= n:
            raise ValueError("unterminated label set")
        if s[pos] == "}":
            return labels, pos + 1
        m = _PAIR.match(s, pos)
        if m is None:
            raise ValueError("bad label")
        v = m.group(2)
        labels[m.group(1)] = _unescape(v) if "\\" in v else v
        pos = m.end()


def _parse_value(v: str) -> float:
    if v in ("+Inf", "Inf"):
        return math.inf
    if v == "-Inf":
        return -math.inf
    return float(v)


SeriesCache = dict[str, tuple[str, dict[str, str]]]
MAX_CACHE = 200_000


def parse(
    text: str, prefixes: tuple[str, ...] | None = None, cache: SeriesCache | None = None
) -> ParseResult:
    """All samples of an exposition (only names starting with ``prefixes`` if given).

    ``cache`` maps a series' text to its parsed (name, labels); pass the same dict on every
    scrape of a target so each series' labels are parsed once. Samples share the cached dict:
    do not mutate ``Sample.labels``.
    """
    res = ParseResult()
    if cache is not None and len(cache) > MAX_CACHE:
        cache.clear()
    for line in text.split("\n"):  # not splitlines(): \x1c-\x1e, \x85 may sit in label values
        line = line.strip(" \t\r")
        if not line:
            continue
        if line.startswith("#"):
            parts = line.split(None, 3)
            if len(parts) >= 4 and parts[1] == "TYPE":
                res.types[parts[2]] = parts[3]
            continue
        if prefixes is not None and not line.startswith(prefixes):
            continue
        try:
            brace = line.find("{")
            space = line.find(" ")
            if brace != -1 and (space == -1 or brace < space):
                end = line.rfind("}") + 1
                series = line[:end]
                hit = cache.get(series) if cache is not None else None
                if hit is None:
                    name = line[:brace]
                    labels, end2 = _parse_labels(line, brace)
                    if end2 != end:
                        raise ValueError("text after the label set")
                    if cache is not None:
                        cache[series] = (name, labels)
                else:
                    name, labels = hit
                rest = line[end:].split()
            else:
                name, *rest = line.split()
                series = name
                labels = {}
            if not name or not rest:
                raise ValueError("no value")
            res.samples.append(Sample(name, labels, _parse_value(rest[0]), series))
        except (ValueError, IndexError):
            res.bad_lines += 1
    return res


def iter_samples(text: str, prefix: str = "") -> Iterator[Sample]:
    for s in parse(text).samples:
        if s.name.startswith(prefix):
            yield s
