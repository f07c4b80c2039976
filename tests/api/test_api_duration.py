"""Istio duration strings -> float seconds."""

from __future__ import annotations

import pytest

from diktyo.api import DurationError, parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("0.5s", 0.5),
        ("100ms", 0.1),
        ("1m", 60.0),
        ("1h", 3600.0),
        ("1h30m", 5400.0),
        ("250us", 0.00025),
        ("10ns", 1e-8),
        (".5s", 0.5),
        ("2.5m", 150.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "1", "s", "1x", "1 s", "-1s", "1s2", "abc", "1.2.3s"])
def test_bad_duration_raises(text: str) -> None:
    with pytest.raises(DurationError):
        parse_duration(text)
