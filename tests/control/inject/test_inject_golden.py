"""Golden tests: testdata/<case>.in.yaml -> inject_pod -> <case>.out.yaml; capture rules likewise."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from diktyo.control.inject.capture import CapturePlan, render_rules
from diktyo.control.inject.config import InjectConfig
from diktyo.control.inject.manifest import dump_docs, load_docs
from diktyo.control.inject.pod import inject_pod

TESTDATA = Path(__file__).parent / "testdata"
CASES = sorted(p.name[: -len(".in.yaml")] for p in TESTDATA.glob("*.in.yaml"))


def test_cases_present() -> None:
    assert {"plain", "opt_out", "already_injected", "named_ports", "custom_image"} <= set(CASES)


@pytest.mark.parametrize("case", CASES)
def test_inject_golden(case: str, golden: Callable[[Path, str], None]) -> None:
    (pod,) = load_docs((TESTDATA / f"{case}.in.yaml").read_text(encoding="utf-8"))
    out = inject_pod(pod, InjectConfig())
    golden(TESTDATA / f"{case}.out.yaml", dump_docs([out]))


@pytest.mark.parametrize("case", CASES)
def test_inject_is_idempotent(case: str) -> None:
    (pod,) = load_docs((TESTDATA / f"{case}.in.yaml").read_text(encoding="utf-8"))
    once = inject_pod(pod)
    assert inject_pod(once) == once


CAPTURE_CASES = {
    "default": CapturePlan(),
    "include_inbound_ports": CapturePlan(include_inbound_ports="9080,9443"),
    "no_inbound": CapturePlan(include_inbound_ports=""),
    "outbound_ranges": CapturePlan(include_outbound_ip_ranges="10.0.0.0/8,172.16.0.0/12",
                                   exclude_outbound_ip_ranges=("10.96.0.1/32",),
                                   exclude_outbound_ports=(5432,)),
}


@pytest.mark.parametrize("case", sorted(CAPTURE_CASES))
def test_capture_rules_golden(case: str, golden: Callable[[Path, str], None]) -> None:
    golden(TESTDATA / "capture" / f"{case}.rules", render_rules(CAPTURE_CASES[case]))
