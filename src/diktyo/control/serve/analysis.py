"""Analysis of the served config, run once per change.

An apply is analyzed before it is stored (``POST /v1/config`` rejects what breaks the mesh),
and the push that follows shows the findings (``GET /v1/config``, the dashboard). Both ask
about the same resources and registry, so ``Analysis`` remembers the last few answers, keyed
by the resource objects themselves (the store keeps the very objects an apply loaded) and the
registry's value: a change is analyzed once, not once per apply and again per push, and the
"before" side of an apply is the answer the last push already has.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

from diktyo.control.model import Registry

log = logging.getLogger(__name__)


class Analysis:
    """``findings(resources, registry)``: ``validate.analyze`` with a small memory."""

    def __init__(self, keep: int = 4) -> None:
        self.keep = keep
        self.runs = 0  # how many times the analyzers actually ran (tests, stats)
        self._memo: list[tuple[tuple[Any, ...], Registry, list[Any]]] = []
        self._lock = threading.Lock()  # pushes and applies analyze in worker threads

    def findings(self, resources: Sequence[Any], registry: Registry) -> list[Any]:
        """The analyzers' findings; raises what a validator raises (callers decide)."""
        key = tuple(resources)
        with self._lock:
            for seen, reg, found in self._memo:
                if (
                    len(seen) == len(key)
                    and reg == registry
                    and all(a is b for a, b in zip(seen, key, strict=True))
                ):
                    return found
        from diktyo.control.validate import analyze

        found = list(analyze(key, registry))
        with self._lock:
            self.runs += 1
            self._memo.insert(0, (key, registry, found))
            del self._memo[self.keep :]
        return found
