"""Golden tests: testdata/<case>.in.yaml -> inject_pod -> <case>.out.yaml; capture rules likewise."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from diktyo.control.inject.capture import CapturePlan, init_args
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
    "default": (CapturePlan(), "-i * -x  -b * -d 15090,15021,15020"),
    "include_inbound_ports": (CapturePlan(include_inbound_ports="9080,9443"),
                              "-i * -x  -b 9080,9443 -d 15090,15021,15020"),
    "no_inbound": (CapturePlan(include_inbound_ports=""), "-i * -x  -b  -d 15090,15021,15020"),
    "outbound_ranges": (CapturePlan(include_outbound_ip_ranges="10.0.0.0/8,172.16.0.0/12",
                                    exclude_outbound_ip_ranges=("10.96.0.1/32",),
                                    exclude_outbound_ports=(5432,)),
                        ("-i 10.0.0.0/8,172.16.0.0/12 -x 10.96.0.1/32 -b * -d 15090,15021,15020 "
                         "-o 5432")),
}
COMMON = "init --apply -p 15001 -z 15006 -u 1337 -g 1337 -m REDIRECT "


@pytest.mark.parametrize("case", sorted(CAPTURE_CASES))
def test_init_container_command(case: str) -> None:
    """Istio's istio-init flags (``istio-iptables -p 15001 -z 15006 -u 1337 -m REDIRECT -i '*'
    -x "" -b '*' -d 15090,15021,15020``), for ``diktyo init``."""
    plan, rest = CAPTURE_CASES[case]
    assert " ".join(init_args(plan)) == COMMON + rest


@pytest.mark.parametrize("case", sorted(CAPTURE_CASES))
def test_init_args_mean_the_plan_to_diktyo_init(case: str) -> None:
    init = pytest.importorskip(
        "diktyo.cli.init", reason="`diktyo init` (engineer netns, issue 10) is not on this "
        "branch; this runs once both are merged")
    from diktyo.cli.main import build_parser

    plan, _ = CAPTURE_CASES[case]
    args = build_parser().parse_args(init_args(plan))
    assert args.apply
    cfg = init.config_from_args(args)
    assert (cfg.proxy_port, cfg.inbound_capture_port) == (15001, 15006)
    assert (str(cfg.proxy_uid), str(cfg.proxy_gid), cfg.interception_mode) == ("1337", "1337", "REDIRECT")
    assert cfg.inbound_ports_include == plan.include_inbound_ports
    assert cfg.inbound_ports_exclude == ",".join(map(str, plan.exclude_inbound_ports))
    assert cfg.outbound_ip_ranges_include == plan.include_outbound_ip_ranges
    assert cfg.outbound_ip_ranges_exclude == ",".join(plan.exclude_outbound_ip_ranges)
    assert cfg.outbound_ports_exclude == ",".join(map(str, plan.exclude_outbound_ports))
