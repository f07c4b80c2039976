"""Istio durations ("1s", "0.5s", "100ms", "1m", "1h30m") parsed to float seconds."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BeforeValidator

_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


class DurationError(ValueError):
    """A string that is not an Istio duration."""


def parse_duration(value: str) -> float:
    """Parse a Go/protobuf style duration string into seconds.

    >>> parse_duration("1.5s"), parse_duration("100ms"), parse_duration("1h30m")
    (1.5, 0.1, 5400.0)
    """
    text = value.strip()
    if not text:
        raise DurationError("empty duration")
    pos = 0
    total = 0.0
    for m in _PART.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos != len(text) or pos == 0:
        raise DurationError(f"invalid duration {value!r}")
    return total


def _validate(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, str):
        raise ValueError(  # noqa: TRY004 - pydantic turns only ValueError into a field error
            f"invalid duration {value!r}: expected a string with a unit (ns, us, ms, s, m, h)"
        )
    try:
        seconds = parse_duration(value)
    except DurationError:
        raise ValueError(
            f"invalid duration {value!r}: expected a number with a unit (ns, us, ms, s, m, h)"
        ) from None
    if seconds < 0.001:
        # Istio's CRDs: duration(self) >= duration('1ms')
        raise ValueError(f"invalid duration {value!r}: must be a valid duration greater than 1ms")
    return seconds


Duration = Annotated[float, BeforeValidator(_validate)]
"""A pydantic field type: an Istio duration string, stored as float seconds."""
