"""Golden tests for translate (see translate_golden.py for the input format)."""

from __future__ import annotations

import pytest
from translate_golden import cases, check_golden


@pytest.mark.parametrize("case", cases())
def test_golden(case: str) -> None:
    check_golden(case)
