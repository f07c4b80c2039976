#!/usr/bin/env python3
"""Summarise a py-spy raw (collapsed stacks) profile: top functions by self and inclusive time.

python bench/flame_summary.py bench/results/profile-DATE.txt [TOP]
"""

from __future__ import annotations

import collections
import re
import sys
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _name(frame: str, with_line: bool) -> str:
    m = _FRAME.match(frame)
    if not m:
        return frame
    file = m["file"].rsplit("/", 1)[-1]
    return (
        f"{m['func']} ({file}:{m['line']})" if with_line and m["line"] else f"{m['func']} ({file})"
    )


def summarise(path: str, top: int = 25) -> str:
    self_t: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    self_line: collections.Counter[str] = collections.Counter()
    total = 0
    for line in Path(path).read_text().splitlines():
        stack, _, n = line.rstrip().rpartition(" ")
        if not stack:
            continue
        count = int(n)
        total += count
        raw = stack.split(";")
        frames = [_name(f, False) for f in raw]
        self_t[frames[-1]] += count
        self_line[_name(raw[-1], True)] += count
        for f in set(frames):
            incl[f] += count
    out = [f"{total} samples", "", "self %  function (file)"]
    out += [f"{100 * c / total:5.1f}  {f}" for f, c in self_t.most_common(top)]
    out += ["", "self %  line"]
    out += [f"{100 * c / total:5.1f}  {f}" for f, c in self_line.most_common(top)]
    out += ["", "inclusive %  function"]
    out += [f"{100 * c / total:5.1f}  {f}" for f, c in incl.most_common(top)]
    return "\n".join(out)


if __name__ == "__main__":
    print(summarise(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 25))
