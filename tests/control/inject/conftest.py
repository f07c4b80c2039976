"""Golden-file helper for injection tests: DIKTYO_REFRESH_GOLDEN=1 rewrites, else unified diff."""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from pathlib import Path

import pytest

TESTDATA = Path(__file__).parent / "testdata"


def check_golden(path: Path, actual: str) -> None:
    if os.environ.get("DIKTYO_REFRESH_GOLDEN") == "1" or not path.exists():
        if os.environ.get("DIKTYO_REFRESH_GOLDEN") != "1":
            path.write_text(actual, encoding="utf-8")
            pytest.fail(f"golden file {path.name} was missing and has been written; check it in")
        path.write_text(actual, encoding="utf-8")
        return
    expected = path.read_text(encoding="utf-8")
    if expected != actual:
        diff = "".join(difflib.unified_diff(
            expected.splitlines(keepends=True), actual.splitlines(keepends=True),
            fromfile=f"{path.name} (golden)", tofile=f"{path.name} (actual)"))
        pytest.fail(f"{path.name} differs (DIKTYO_REFRESH_GOLDEN=1 to accept):\n{diff}")


@pytest.fixture
def golden() -> Callable[[Path, str], None]:
    return check_golden

