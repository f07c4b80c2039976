"""``diktyo init`` rules: golden tests against Istio's own istio-iptables test data, golden
tests of the traffic.sidecar.istio.io annotations, and the errors bad settings get."""

from __future__ import annotations

import difflib
import os
from dataclasses import replace
from pathlib import Path

import pytest

from diktyo.cli.main import main
from diktyo.platform.capture_rules import (
    CaptureConfig,
    CaptureConfigError,
    build_rules,
    from_annotations,
    render,
)

HERE = Path(__file__).resolve().parent
ISTIO = HERE / "testdata" / "istio-iptables"
CASES = HERE / "testdata" / "capture"

# Istio's run_test.go: constructTestConfig() (-p 15001 -z 15006 -e 15008, uid/gid 1337,
# nothing included) plus each case's settings
ISTIO_BASE = CaptureConfig()
ISTIO_CASES = {
    "empty": {},
    "ipnets": {"outbound_ip_ranges_include": "10.0.0.0/8"},
    "inbound-ports-wildcard": {"inbound_ports_include": "*"},
    "outbound-ports-include": {"outbound_ports_include": "32000,31000"},
    "outbound-ports-exclude": {"outbound_ports_exclude": "22,80,443"},
    "inbound-wildcard-exclude": {
        "inbound_ports_include": "*",
        "inbound_ports_exclude": "22,80,443",
    },
}


def _istio_rules(name: str) -> list[str]:
    """The golden's rules: Istio's stub also records its iptables-save calls; drop them."""
    lines = (ISTIO / f"{name}.golden").read_text().splitlines()
    return [ln for ln in lines if ln not in ("iptables-save", "ip6tables-save")]


def _diff(want: list[str], got: list[str]) -> str:
    return "\n".join(difflib.unified_diff(want, got, "istio", "diktyo", lineterm=""))


@pytest.mark.parametrize("name", sorted(ISTIO_CASES))
def test_same_rules_as_istio_iptables(name: str) -> None:
    got = build_rules(replace(ISTIO_BASE, **ISTIO_CASES[name]))  # type: ignore[arg-type]
    want = _istio_rules(name)
    assert got == want, _diff(want, got)


def test_every_stored_istio_golden_is_compared() -> None:
    stored = {p.stem for p in ISTIO.glob("*.golden")}
    assert stored == set(ISTIO_CASES)


def _run_init(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["init", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "case", sorted(p.name.removesuffix(".in.yaml") for p in CASES.glob("*.in.yaml"))
)
def test_annotations_golden(case: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run_init(["--annotations", str(CASES / f"{case}.in.yaml")], capsys)
    assert code == 0, err
    golden = CASES / f"{case}.out"
    if os.environ.get("DIKTYO_REFRESH_GOLDEN") == "1":
        golden.write_text(out)
    want = golden.read_text()
    assert out == want, _diff(want.splitlines(), out.splitlines())


def test_default_is_what_istios_injector_passes(capsys: pytest.CaptureFixture[str]) -> None:
    """No flags: istio-iptables -p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -x '' -b '*'
    -d 15090,15021,15020, i.e. inbound-wildcard-exclude with those ports plus '-i *'."""
    code, out, _ = _run_init([], capsys)
    assert code == 0
    lines = out.splitlines()
    assert "-A ISTIO_INBOUND -p tcp -m multiport --dports 15090,15021,15020 -j RETURN" in lines
    assert lines[-2:] == ["-A ISTIO_OUTPUT -j ISTIO_REDIRECT", "COMMIT"]
    assert out == render(CaptureConfig.injected())


def test_flags_override_annotations(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ann = tmp_path / "a.yaml"
    ann.write_text('traffic.sidecar.istio.io/includeInboundPorts: "9080"\n')
    code, out, _ = _run_init(["--annotations", str(ann), "-b", "7070", "-u", "2000"], capsys)
    assert code == 0
    assert "-A ISTIO_INBOUND -p tcp --dport 7070 -j ISTIO_IN_REDIRECT" in out
    assert "9080" not in out
    assert "--gid-owner 2000" in out  # -g defaults to -u, as in istio-iptables
    assert "1337" not in out


def test_uid_and_gid_lists_each_get_their_three_rules() -> None:
    rules = build_rules(CaptureConfig(proxy_uid="3,4", proxy_gid="1,2"))
    owner = [r for r in rules if "-m owner" in r]
    assert len(owner) == 12
    assert owner[0].endswith("--uid-owner 3 -j ISTIO_IN_REDIRECT")
    assert owner[-1] == "-A ISTIO_OUTPUT -m owner --gid-owner 2 -j RETURN"


def test_loopback_include_keeps_app_self_calls_captured() -> None:
    """Including a loopback range drops the 'app over lo is not captured' rules, as Istio."""
    rules = build_rules(CaptureConfig(outbound_ip_ranges_include="127.1.2.3/32"))
    assert not any("! --uid-owner" in r or "! --gid-owner" in r for r in rules)
    assert rules[-2] == "-A ISTIO_OUTPUT -d 127.1.2.3/32 -j ISTIO_REDIRECT"


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"inbound_ports_include": "80,http"}, "inbound_ports_include: 'http' is not a port"),
        ({"outbound_ports_exclude": "70000"}, "outbound_ports_exclude: '70000'"),
        ({"outbound_ip_ranges_include": "10.0.0.0/33"}, "not an IP range in CIDR form"),
        ({"outbound_ip_ranges_exclude": "*"}, "cannot be '*'"),
        ({"interception_mode": "TPROXY"}, "TPROXY is not implemented"),
        ({"proxy_uid": "istio"}, "'istio' is not a numeric id"),
        ({"proxy_uid": ""}, "at least one id"),
    ],
)
def test_bad_settings_are_named(changes: dict[str, str], words: str) -> None:
    with pytest.raises(CaptureConfigError, match=words.replace("*", r"\*")):
        build_rules(replace(CaptureConfig.injected(), **changes))  # type: ignore[arg-type]


def test_bad_annotation_is_an_error_not_rules(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ann = tmp_path / "pod.yaml"
    ann.write_text('traffic.sidecar.istio.io/excludeOutboundPorts: "smtp"\n')
    code, out, err = _run_init(["--annotations", str(ann)], capsys)
    assert code == 2
    assert out == ""
    assert "outbound_ports_exclude: 'smtp' is not a port number" in err


def test_missing_annotations_file(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run_init(["--annotations", "/nonexistent/pod.yaml"], capsys)
    assert code == 2 and out == ""
    assert "/nonexistent/pod.yaml" in err


def test_exclude_inbound_annotation_adds_to_defaults() -> None:
    cfg = from_annotations({"traffic.sidecar.istio.io/excludeInboundPorts": "9090"})
    assert cfg.inbound_ports_exclude == "15090,15021,15020,9090"
