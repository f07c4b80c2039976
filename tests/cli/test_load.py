"""``diktyo load`` against a real httpbin process on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from diktyo.cli.load import ViaError, proxy_via
from diktyo.cli.main import main
from diktyo.samples.launch import start_sample
from diktyo.testing import free_port

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def httpbin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("httpbin") / "httpbin.log"
    with start_sample(
        "diktyo.samples.httpbin", log_path=Path(log), env={"LOG_REQUESTS": "0"}
    ) as app:
        yield app.url


@pytest.fixture(autouse=True)
def no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)


def load_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    assert main(["load", "-o", "json", *argv]) == 0
    result: dict[str, Any] = json.loads(capsys.readouterr().out)
    return result


def test_counts_200_and_503(httpbin: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["load", "-c", "2", "-n", "30", f"{httpbin}/status/503"]) == 0
    out = capsys.readouterr().out
    assert "Code 503 : 30 (100.0 %)" in out
    assert "Code 200" not in out
    for p in ("50%", "75%", "90%", "99%", "99.9%"):
        assert f"# target {p} " in out
    assert "qps=" in out and "All done 30 calls" in out

    data = load_json(capsys, "-c", "4", "-n", "200", f"{httpbin}/status/200,503")
    assert data["count"] == 200
    assert set(data["codes"]) == {"200", "503"}
    assert data["codes"]["200"] + data["codes"]["503"] == 200
    # as fortio: keep-alive after a 200, a new socket after each 503 unless it was the
    # connection's last request
    n503 = data["codes"]["503"]
    assert n503 <= data["sockets"] <= 4 + n503, (data["sockets"], n503)
    assert data["latency_ms"]["min"] <= data["latency_ms"]["percentiles"]["50"]
    assert data["latency_ms"]["percentiles"]["50"] <= data["latency_ms"]["percentiles"]["99.9"]


def test_default_is_100_requests(httpbin: str, capsys: pytest.CaptureFixture[str]) -> None:
    data = load_json(capsys, f"{httpbin}/get")
    assert data["count"] == 100 and data["codes"] == {"200": 100} and data["connections"] == 8


def test_duration_with_qps_is_bounded(httpbin: str, capsys: pytest.CaptureFixture[str]) -> None:
    data = load_json(capsys, "-c", "2", "-t", "1s", "-qps", "20", f"{httpbin}/get")
    assert 1 <= data["count"] <= 20  # 20 slots in 1 s at 20 qps, none after the end
    assert data["codes"] == {"200": data["count"]}


def test_goes_through_http_proxy(
    httpbin: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # httpbin stands in for the sidecar: it answers absolute-form requests by their path
    monkeypatch.setenv("HTTP_PROXY", httpbin)
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
    data = load_json(
        capsys, "-c", "1", "-n", "5", "-H", "end-user: jason", "http://httpbin:8000/get"
    )
    assert data["proxy"] == httpbin
    assert data["codes"] == {"200": 5}


def test_errors_and_timeouts_are_code_minus_1(
    httpbin: str, capsys: pytest.CaptureFixture[str]
) -> None:
    closed = free_port()  # nothing listens there
    data = load_json(capsys, "-c", "1", "-n", "3", f"http://127.0.0.1:{closed}/")
    assert data["codes"] == {"-1": 3} and data["errors"] == {"connection refused": 3}
    data = load_json(capsys, "-c", "2", "-n", "2", "-timeout", "200ms", f"{httpbin}/delay/2")
    assert data["codes"] == {"-1": 2} and data["errors"] == {"timeout": 2}
    assert main(["load", "-c", "1", "-n", "2", f"{httpbin}/delay/2", "-timeout", "0.2"]) == 0
    out = capsys.readouterr().out
    assert "Code -1 : 2 (100.0 %) (timeout: 2)" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["https://example/"], "not http://"),
        (["-H", "no-colon", "http://127.0.0.1:9/"], "Name: value"),
        (["-c", "0", "http://127.0.0.1:9/"], "-c must be at least 1"),
        (["-qps", "-2", "http://127.0.0.1:9/"], "-qps must be >= 0"),
    ],
)
def test_bad_arguments_explain_themselves(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["load", *argv]) == 2
    assert message in capsys.readouterr().err


def test_bad_duration_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["load", "-t", "soon", "http://127.0.0.1:9/"])
    assert exit_info.value.code == 2
    assert "invalid duration 'soon'" in capsys.readouterr().err


STATE = {
    "name": "bookinfo",
    "pid": 0,
    "workloads": [
        {
            "name": "sleep-1",
            "workload": "sleep",
            "kind": "workload",
            "state": "ready",
            "outbound_port": 15001,
        },
        {
            "name": "sleep-2",
            "workload": "sleep",
            "kind": "workload",
            "state": "starting",
            "outbound_port": 15002,
        },
        {
            "name": "istio-ingressgateway-1",
            "workload": "istio-ingressgateway",
            "kind": "gateway",
            "state": "ready",
            "outbound_port": 15003,
        },
    ],
}


def test_proxy_via_finds_the_sidecar_outbound_port() -> None:
    assert proxy_via(STATE, "sleep") == "http://127.0.0.1:15001"
    assert proxy_via(STATE, "sleep-2") == "http://127.0.0.1:15002"
    with pytest.raises(ViaError, match="known: sleep, sleep-1, sleep-2"):
        proxy_via(STATE, "fortio")
    with pytest.raises(ViaError, match="no mesh is running"):
        proxy_via(None, "sleep")


def test_via_sends_through_that_workloads_sidecar(
    httpbin: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a running mesh whose "sleep" sidecar is httpbin (it answers absolute-form requests)
    state = {**STATE, "pid": os.getpid()}
    state["workloads"] = [
        {**STATE["workloads"][0], "outbound_port": int(httpbin.rsplit(":", 1)[1])}
    ]
    (tmp_path / "mesh.json").write_text(json.dumps(state))
    monkeypatch.setenv("DIKTYO_HOME", str(tmp_path))
    data = load_json(
        capsys, "--via", "sleep", "-c", "1", "-n", "4", "http://httpbin:8000/status/503"
    )
    assert data["proxy"] == httpbin and data["codes"] == {"503": 4}
    assert main(["load", "--via", "nope", "http://httpbin:8000/get"]) == 2
    assert "no ready workload or replica of that name" in capsys.readouterr().err


def test_ctrl_c_ends_early_and_prints_the_result(httpbin: str) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "diktyo.cli.main",
            "load",
            "-c",
            "2",
            "-t",
            "60s",
            "-qps",
            "50",
            f"{httpbin}/get",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    first = proc.stderr.readline()  # "Starting at ..." once it runs
    assert first.startswith("Starting at 50 qps with 2 connection(s) for 60s"), first
    time.sleep(0.5)  # real time: the load generator runs a while before SIGINT
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "interrupted" in err
    assert "Code 200 : " in out and "All done" in out
