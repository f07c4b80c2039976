"""Istio standard metrics: labels, buckets, exposition checked by the real promtool."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from diktyo.proxy.stats import Stats
from diktyo.telemetry.exposition import escape_label_value, render
from diktyo.telemetry.istio_metrics import (
    DEFAULT_BUCKETS,
    LABEL_NAMES,
    IstioMetrics,
    PeerLabels,
    WorkloadInfo,
)
from diktyo.telemetry.stats import Stat, StatsList

PROMTOOL = shutil.which("promtool")
# Lint findings promtool reports on names that Istio/Envoy themselves chose; dashboards depend
# on these exact names, so they are kept. Anything else is a failure.
ACCEPTED_LINT = (
    re.compile(r'^istio_request_duration_milliseconds use base unit "seconds"'),
    re.compile(r'^envoy_(cluster|http)_[a-z0-9_]+ counter metrics should have "_total" suffix$'),
)


def promtool_problems(text: str) -> list[str]:
    assert PROMTOOL, "promtool missing: apt-get install prometheus"
    res = subprocess.run(
        [PROMTOOL, "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    lines = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.strip()]
    if res.returncode not in (0, 3):  # 1 = parse error
        return lines or [f"promtool exit {res.returncode}"]
    return [ln for ln in lines if not any(p.match(ln) for p in ACCEPTED_LINT)]


def realistic() -> Stats:
    stats = Stats()
    m = stats.metrics
    pp = WorkloadInfo.from_labels(
        "productpage-v1", "default", {"app": "productpage", "version": "v1"},
        principal="spiffe://cluster.local/ns/default/sa/bookinfo-productpage",
    )  # fmt: skip
    for v in ("v1", "v2", "v3"):
        rv = WorkloadInfo.from_labels(
            f"reviews-{v}", "default", {"app": "reviews", "version": v},
            principal="spiffe://cluster.local/ns/default/sa/bookinfo-reviews",
        )  # fmt: skip
        host = "reviews.default.svc.cluster.local"
        src = m.peer(PeerLabels.build("source", pp, rv, host, mtls=True))
        dst = m.peer(PeerLabels.build("destination", pp, rv, host, mtls=True))
        for i in range(20):
            m.record(src, 200, "-", 3.0 + i, 0, 1500)
            m.record(dst, 200, "-", 2.0 + i, 0, 1500)
        m.record(src, 503, "UO", 0.2, 0, 81)
        m.record(src, 504, "UT", 30000.0, 0, 24)
        m.record(src, 200, "-", 1.0, 10, 20, grpc_status="0")
    tcp = m.peer(PeerLabels.build("source", pp, None, "mongo.db.svc.cluster.local", "tcp"))
    m.tcp_open(tcp)
    m.tcp_bytes(tcp, 100, 2000)
    m.tcp_close(tcp)
    weird = m.peer(PeerLabels(source_workload='we"ird\\name\nx', destination_service="a b"))
    m.record(weird, 0, "DC", 12.5, 5, 0)
    cl = "outbound|9080|v2|reviews.default.svc.cluster.local"
    stats.inc_cluster(cl, "upstream_rq_pending_overflow", 3)
    stats.inc_cluster(cl, "upstream_rq_retry")
    stats.inc_cluster('we"ird\\cluster\nname', "upstream_cx_total")
    stats.cluster_stats(cl)["upstream_cx_active"] = 4
    stats.families["config_pushes"].inc()
    stats.server["downstream_rq_total"] += 7
    return stats


def test_labels_in_istio_order_with_unknown_defaults() -> None:
    m = IstioMetrics()
    key = m.peer(PeerLabels(reporter="destination"))
    m.record(key, 200, "-", 1.0, 0, 0)
    text = render(m)
    line = next(ln for ln in text.splitlines() if ln.startswith("istio_requests_total{"))
    names = re.findall(r'([a-z_]+)="', line)
    assert tuple(names) == LABEL_NAMES
    assert 'source_workload="unknown"' in line and 'response_flags="-"' in line
    assert line.endswith(" 1")


def test_peer_interning_gives_one_series() -> None:
    m = IstioMetrics()
    a = m.peer(PeerLabels(source_workload="a"))
    b = m.peer(PeerLabels(source_workload="a"))
    assert a is b
    m.record(a, 200, "-", 1, 0, 0)
    m.record(b, 200, "-", 1, 0, 0)
    assert render(m).count("istio_requests_total{") == 1
    assert m.request_count(source_workload="a", response_code="200") == 2


def test_buckets_cumulative_and_le_inclusive() -> None:
    m = IstioMetrics()
    k = m.peer(PeerLabels())
    for d in (0.5, 0.6, 5.0, 7_000_000.0):
        m.record(k, 200, "-", d, 0, 1)
    text = render(m)

    def bucket(name: str, le: str) -> int:
        pat = rf'^{name}_bucket{{.*,le="{re.escape(le)}"}} (\d+)$'
        return int(re.search(pat, text, re.MULTILINE).group(1))  # type: ignore[union-attr]

    d = "istio_request_duration_milliseconds"
    assert bucket(d, "0.5") == 1  # le is inclusive
    assert bucket(d, "1") == 2
    assert bucket(d, "5") == 3
    assert bucket(d, "3600000") == 3
    assert bucket(d, "+Inf") == 4
    assert re.search(r"^istio_request_duration_milliseconds_sum{.*} 7000006.1$", text, re.MULTILINE)
    assert bucket("istio_request_bytes", "0.5") == 4  # zero-byte bodies
    assert bucket("istio_response_bytes", "1") == 4
    assert text.count("istio_request_bytes_bucket{") == len(DEFAULT_BUCKETS) + 1


def test_connection_security_policy_rules() -> None:
    src = PeerLabels.build("source", None, None, "reviews.default.svc.cluster.local", mtls=True)
    dst = PeerLabels.build(
        "destination", None, None, "reviews.default.svc.cluster.local", mtls=True
    )
    plain = PeerLabels.build("destination", None, None, "x.ns.svc.cluster.local", mtls=False)
    assert src.connection_security_policy == "unknown"
    assert dst.connection_security_policy == "mutual_tls"
    assert plain.connection_security_policy == "none"
    assert dst.destination_service_name == "reviews"
    assert dst.destination_service_namespace == "default"


def test_workload_info_from_labels_and_peer_header_roundtrip() -> None:
    w = WorkloadInfo.from_labels("reviews-v2", "default", {"app": "reviews", "version": "v2"})
    assert (w.app, w.version, w.canonical_service, w.canonical_revision) == (
        "reviews", "v2", "reviews", "v2",
    )  # fmt: skip
    assert WorkloadInfo.decode(w.encode()) == w
    assert WorkloadInfo.decode("!!notbase64") is None
    assert WorkloadInfo.decode("W10") is None  # "[]": wrong shape


def test_workload_info_from_principal() -> None:
    w = WorkloadInfo.from_principal("spiffe://cluster.local/ns/shop/sa/cart")
    assert w.namespace == "shop" and w.principal.endswith("/sa/cart") and w.name == "unknown"
    assert WorkloadInfo.from_principal("garbage").namespace == "unknown"


def test_escaping() -> None:
    assert escape_label_value('a"b\\c\nd') == 'a\\"b\\\\c\\nd'


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed")
def test_realistic_exposition_passes_promtool() -> None:
    text = render(realistic())
    assert promtool_problems(text) == []
    assert "# TYPE istio_tcp_connections_opened_total counter" in text
    assert 'envoy_cluster_upstream_rq_pending_overflow{cluster_name="outbound|9080|v2|' in text


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed")
def test_promtool_check_is_not_vacuous() -> None:
    text = render(realistic())
    broken = text.replace(
        "# TYPE istio_requests_total counter\n",
        "# TYPE istio_requests_total counter\nistio_requests_total{bad 1\n",
        1,
    )
    assert promtool_problems(broken) != []


def test_stats_lists_reject_bad_names_and_duplicates() -> None:
    ok = Stat("x_total", "counter", "x")
    with pytest.raises(ValueError, match="declared twice"):
        StatsList("diktyo_", (), (ok, ok))
    with pytest.raises(ValueError, match="invalid metric name"):
        StatsList("diktyo_", (), (Stat("bad-name", "counter", "x"),))
    with pytest.raises(ValueError, match="invalid label name"):
        StatsList("diktyo_", ("__reserved",), (ok,))
    with pytest.raises(ValueError, match="kind"):
        StatsList("diktyo_", (), (Stat("y", "summary", "x"),))
