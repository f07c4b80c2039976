"""Stats declared in one place: every declared stat is exported with its type, every stat the
sidecar's code counts is declared, label values are escaped once and correctly."""

from __future__ import annotations

import random
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from diktyo.core.clock import ManualClock
from diktyo.proxy.stats import Stats
from diktyo.proxy.upstream.cluster import ClusterState
from diktyo.snapshot.model import Cluster, Endpoint, LoadBalancer, OutlierDetection
from diktyo.telemetry import stats as stats_mod
from diktyo.telemetry.istio_metrics import PeerLabels
from diktyo.telemetry.stats import (
    CLUSTER_STATS,
    ISTIO_GRPC_STATS,
    ISTIO_HTTP_STATS,
    ISTIO_NAMES,
    ISTIO_TCP_STATS,
    PROXY_STATS,
    SERVER_STATS,
)

SRC = Path(__file__).resolve().parents[2] / "src" / "diktyo"
CL = "outbound|9080|v1|reviews.default.svc.cluster.local"
PROMTOOL = shutil.which("promtool")


def types_and_samples(text: str) -> tuple[dict[str, str], dict[str, list[str]]]:
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE))
    samples: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group(0)  # type: ignore[union-attr]
            samples.setdefault(re.sub(r"_(bucket|sum|count)$", "", name), []).append(line)
    return types, samples


def everything_counted() -> Stats:
    s = Stats()
    for st in CLUSTER_STATS.stats:
        if st.kind == "counter":
            s.inc_cluster(CL, st.key)
        else:
            s.cluster_stats(CL)[st.key] = 2
    for st in SERVER_STATS.stats:
        s.server[st.key] += 1
    for st in PROXY_STATS.stats:
        s.proxy[st.key] += 1
    http = s.metrics.peer(PeerLabels.build("source", None, None, "reviews.default"))
    s.record(http, 200, "-", 3.0, 10, 20)
    tcp = s.metrics.peer(PeerLabels.build("source", None, None, "db.default", "tcp"))
    s.metrics.tcp_open(tcp)
    s.metrics.tcp_bytes(tcp, 5, 6)
    s.metrics.tcp_close(tcp)
    s.metrics.record_messages(http, 200, "-", "0", 3, 4)
    return s


def test_every_declared_stat_is_exported_with_its_type() -> None:
    text = everything_counted().render_prometheus()
    types, samples = types_and_samples(text)
    for slist in (SERVER_STATS, CLUSTER_STATS, PROXY_STATS):
        for st in slist.stats:
            name = slist.name(st.key)
            assert types.get(name) == st.kind, name
            assert samples.get(name), f"{name} declared but not exported"
    for st in (*ISTIO_HTTP_STATS.stats, *ISTIO_GRPC_STATS.stats, *ISTIO_TCP_STATS.stats):
        name = ISTIO_NAMES[st.api]
        assert types.get(name) == st.kind, name
        assert samples.get(name), name
    # nothing exported that is not declared
    declared = {sl.name(st.key) for sl in (SERVER_STATS, CLUSTER_STATS, PROXY_STATS)
                for st in sl.stats} | set(ISTIO_NAMES.values())  # fmt: skip
    assert set(types) == declared


def test_one_help_and_type_per_family() -> None:
    text = everything_counted().render_prometheus()
    helps = re.findall(r"^# HELP (\S+) ", text, re.MULTILINE)
    assert len(helps) == len(set(helps))
    assert "Undeclared" not in text


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (apt-get install prometheus)")
def test_everything_counted_passes_promtool() -> None:
    s = everything_counted()
    s.inc_cluster('a"b\\c\nd', "upstream_cx_total")
    res = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=s.render_prometheus(),
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert res.returncode in (0, 3), res.stdout + res.stderr  # 3: lint findings only
    lint = [
        ln for ln in (res.stdout + res.stderr).splitlines()
        if ln.strip()
        and not re.match(r'^envoy_(cluster|http)_\w+ counter metrics should have "_total"', ln)
        and not ln.startswith("istio_request_duration_milliseconds use base unit")
    ]  # fmt: skip
    assert lint == []


def test_cluster_label_values_are_escaped_once_and_correctly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[str, ...]] = []
    real = stats_mod.render_labels

    def counting(names, values):  # type: ignore[no-untyped-def]
        values = tuple(values)
        calls.append(values)
        return real(names, values)

    monkeypatch.setattr(stats_mod, "render_labels", counting)
    s = Stats()
    weird = 'we"ird\\clu\nster'
    for _ in range(3):
        s.inc_cluster(weird, "upstream_cx_total")
        s.inc_cluster(weird, "upstream_rq_retry")
    first = s.render_prometheus()
    second = s.render_prometheus()
    assert first == second
    assert calls == [(weird,)]  # made once with the block, never per increment or scrape
    assert 'envoy_cluster_upstream_cx_total{cluster_name="we\\"ird\\\\clu\\nster"} 3\n' in first
    assert "\nster" not in first  # a raw newline would split the sample line


def test_undeclared_stat_is_kept_and_says_where_to_declare(
    caplog: pytest.LogCaptureFixture,
) -> None:
    s = Stats()
    s.inc_cluster(CL, "upstream_made_up")
    s.server["made_up"] = s.server.get("made_up", 0) + 1
    with pytest.raises(KeyError):
        s.server["also_made_up"] += 1  # a typo on the hot path fails, it does not fork a stat
    text = s.render_prometheus()
    assert f'envoy_cluster_upstream_made_up{{cluster_name="{CL}"}} 1' in text
    assert "envoy_http_made_up 1" in text
    assert "declare it in diktyo.telemetry.stats" in text
    assert "not declared" in caplog.text


def test_kernel_counters_and_gauges_are_read_at_scrape() -> None:
    """upstream_rq_total and the outlier-detection stats were declared but never exported."""
    clock = ManualClock(start=0.0)
    cluster = Cluster(
        name=CL,
        endpoints=tuple(Endpoint(address=f"10.0.0.{i}", port=9080) for i in (1, 2, 3)),
        lb=LoadBalancer(simple="ROUND_ROBIN"),
        outlier=OutlierDetection(max_ejection_percent=100.0),
    )
    cs = ClusterState(cluster, clock, random.Random(7))
    bad = cs.hosts[1]
    for _ in range(5):
        cs.on_request_start(bad)
        cs.on_request_end(bad, 503, False)
    cs.on_request_start(cs.hosts[0])
    s = Stats()
    text = s.render_prometheus({CL: cs})
    lbl = f'{{cluster_name="{CL}"}}'
    assert f"envoy_cluster_upstream_rq_total{lbl} 5\n" in text
    assert f"envoy_cluster_upstream_rq_5xx{lbl} 5\n" in text
    assert f"envoy_cluster_outlier_detection_ejections_enforced_total{lbl} 1\n" in text
    assert f"envoy_cluster_outlier_detection_ejections_active{lbl} 1\n" in text
    assert f"envoy_cluster_upstream_rq_active{lbl} 1\n" in text
    # a cluster gone from the snapshot keeps its counters but loses its gauges
    text = s.render_prometheus({})
    assert f"envoy_cluster_upstream_rq_total{lbl} 5\n" in text
    assert "upstream_rq_active" not in text


def _src(*parts: str) -> str:
    return (SRC.joinpath(*parts)).read_text()


def test_every_stat_the_proxy_counts_is_declared() -> None:
    """Scan the sidecar's sources for the stat keys it counts: each must be declared."""
    proxy = [p for p in (SRC / "proxy").rglob("*.py") if p.name != "stats.py"]
    text = "\n".join(p.read_text() for p in proxy)
    cluster_keys = set(re.findall(r'inc_cluster\(\s*[^,]+,\s*"(\w+)"', text))
    server_keys = set(re.findall(r'\bserver\[\s*"(\w+)"\s*\]', text))
    server_keys |= set(re.findall(r'stats\.server\.get\(\s*"(\w+)"', text))
    server_keys |= set(re.findall(r'self\.stats\["(\w+)"\]', _src("proxy", "access_log.py")))
    denied = re.search(r"_DENIED_COUNTERS = \{(.*?)\}", _src("proxy", "filters", "inbound.py"))
    assert denied is not None
    server_keys |= set(re.findall(r'"(\w+)"', denied.group(1)))
    server_keys.add("security_denied")
    # codec errors are counted as downstream_rq_<status> for the statuses a request can get
    codec = _src("proxy", "codec", "http1.py")
    statuses = {int(n) for n in re.findall(r"CodecError\((\d{3})", codec)} - {502}
    server_keys |= {f"downstream_rq_{n}" for n in statuses}
    assert len(cluster_keys) >= 8 and len(server_keys) >= 10  # the scan found the call sites
    assert sorted(k for k in cluster_keys if k not in CLUSTER_STATS) == []
    assert sorted(k for k in server_keys if k not in SERVER_STATS) == []
