"""Telemetry API metric overrides applied at scrape time: disabled families, removed and upserted
tags, series that become equal after a removal summed into one."""

from __future__ import annotations

from diktyo.snapshot.model import MetricOverride
from diktyo.telemetry.istio_metrics import IstioMetrics, PeerLabels, WorkloadInfo


def _metrics() -> IstioMetrics:
    m = IstioMetrics()
    me = WorkloadInfo.from_labels("web", "shop", {"app": "web"})
    other = WorkloadInfo.from_labels("db", "shop", {"app": "db"})
    for protocol in ("http", "grpc"):
        for reporter in ("source", "destination"):
            peer = m.peer(
                PeerLabels.build(reporter, me, other, "db.shop.svc.cluster.local", protocol)
            )
            m.record(peer, 200, "-", 3.0, 10, 20)
    return m


def _text(m: IstioMetrics) -> str:
    out: list[str] = []
    m.collect(out)
    return "".join(out)


def test_without_overrides_every_series_is_there() -> None:
    text = _text(_metrics())
    assert text.count("istio_requests_total{") == 4


def test_removed_tag_merges_series_and_upsert_adds_a_constant() -> None:
    m = _metrics()
    m.overrides = (
        MetricOverride(
            metric="REQUEST_COUNT", remove=("request_protocol",), upsert={"env": "prod"}
        ),
    )
    lines = [ln for ln in _text(m).splitlines() if ln.startswith("istio_requests_total{")]
    assert len(lines) == 2  # http and grpc series of each reporter summed
    assert all(ln.endswith(" 2") and 'env="prod"' in ln for ln in lines)
    assert all("request_protocol" not in ln for ln in lines)
    # other families keep their labels
    counts = [ln for ln in _text(m).splitlines() if ln.startswith("istio_request_bytes_count")]
    assert len(counts) == 4 and sum('request_protocol="grpc"' in ln for ln in counts) == 2


def test_disabled_for_client_keeps_server_series_and_later_override_wins() -> None:
    m = _metrics()
    m.overrides = (MetricOverride(metric="REQUEST_DURATION", mode="CLIENT", disabled=True),)
    text = _text(m)
    durations = [
        ln for ln in text.splitlines() if ln.startswith("istio_request_duration_milliseconds_count")
    ]
    assert len(durations) == 2 and all('reporter="destination"' in ln for ln in durations)
    m.overrides = (
        MetricOverride(disabled=True),
        MetricOverride(metric="REQUEST_COUNT", disabled=False),
    )
    text = _text(m)
    assert "istio_request_bytes" not in text and "istio_requests_total{" in text


def test_grpc_message_counts_follow_the_overrides() -> None:
    """``GRPC_REQUEST_MESSAGES``/``GRPC_RESPONSE_MESSAGES`` (Istio's Telemetry API names for
    ``istio_request/response_messages_total``) are disabled and re-tagged like the others."""
    m = _metrics()
    me = WorkloadInfo.from_labels("web", "shop", {"app": "web"})
    for reporter in ("source", "destination"):
        peer = m.peer(PeerLabels.build(reporter, me, None, "db.shop.svc.cluster.local", "grpc"))
        m.record_messages(peer, 200, "-", "0", 3, 5)
    m.overrides = (
        MetricOverride(metric="GRPC_REQUEST_MESSAGES", mode="CLIENT", disabled=True),
        MetricOverride(metric="GRPC_RESPONSE_MESSAGES", upsert={"env": "prod"}),
    )
    lines = _text(m).splitlines()
    req = [ln for ln in lines if ln.startswith("istio_request_messages_total{")]
    resp = [ln for ln in lines if ln.startswith("istio_response_messages_total{")]
    assert len(req) == 1 and 'reporter="destination"' in req[0] and req[0].endswith(" 3")
    assert len(resp) == 2 and all('env="prod"' in ln and ln.endswith(" 5") for ln in resp)
