"""Test tiers: markers by directory, so no test file has to carry them.

``make test-fast`` runs ``-m "not (e2e or browser or bench or slow)"``: pure and socket-level
tests (real sidecars and upstreams on 127.0.0.1 are fine). ``make test`` runs everything.
A test elsewhere that starts a whole mesh marks itself ``@pytest.mark.slow``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

# Local meshes default to 'capture: auto' (transparent when run as root); the suite's meshes
# are written for proxy mode (HTTP_PROXY, app ports on 127.0.0.1). Transparent-mode tests set
# 'capture:' in their mesh files, which wins over this (docs/transparent.md).
os.environ.setdefault("DIKTYO_CAPTURE", "proxy")

# first path part below tests/ -> marker given to every test collected there
DIRECTORY_MARKERS = {
    "e2e": "e2e",  # whole local meshes (control plane, sidecars, sample apps)
    "browser": "browser",  # headless Chromium
    "bench": "bench",  # benchmark harness smoke runs
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        try:
            top = Path(item.path).resolve().relative_to(TESTS).parts[0]
        except (ValueError, IndexError):
            continue
        marker = DIRECTORY_MARKERS.get(top)
        if marker is not None:
            item.add_marker(marker)
