"""Fuzzing the parsers of untrusted input: Prometheus text, OTLP bodies, peer metadata."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from diktyo.telemetry.exposition import render
from diktyo.telemetry.istio_metrics import IstioMetrics, PeerLabels, WorkloadInfo
from diktyo.telemetry.otlp import OtlpDecodeError, decode_spans
from diktyo.telemetry.promtext import parse
from diktyo.telemetry.store import MetricStore

label_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=30)


@given(st.text(max_size=300))
def test_parse_never_raises(text: str) -> None:
    res = parse(text)
    assert res.bad_lines >= 0


@given(label_text, label_text, st.integers(0, 599), st.sampled_from(["-", "UO", "UF,URX"]))
@settings(max_examples=60, deadline=None)
def test_any_label_value_round_trips(workload: str, service: str, code: int, flags: str) -> None:
    m = IstioMetrics()
    k = m.peer(PeerLabels(source_workload=workload, destination_service=service))
    m.record(k, code, flags, 1.0, 0, 0)
    res = parse(render(m))
    assert res.bad_lines == 0
    (total,) = [s for s in res.samples if s.name == "istio_requests_total"]
    assert total.labels["source_workload"] == workload
    assert total.labels["destination_service"] == service
    assert total.labels["response_flags"] == flags
    assert total.labels["response_code"] == str(code)


@given(st.binary(max_size=200))
@settings(deadline=None)
def test_otlp_decode_only_raises_its_error(body: bytes) -> None:
    try:
        decode_spans(body)
    except OtlpDecodeError:
        pass


@given(st.text(max_size=100))
def test_peer_metadata_decode_never_raises(value: str) -> None:
    info = WorkloadInfo.decode(value)
    assert info is None or isinstance(info, WorkloadInfo)


@given(st.text(max_size=400))
@settings(max_examples=50, deadline=None)
def test_store_ingest_never_raises(text: str) -> None:
    store = MetricStore()
    store.ingest("x", text, 1_700_000_000.0)
    store.ingest("x", text + '\nistio_requests_total{reporter="source"} 5\n', 1_700_000_005.0)
    store.graph(window=60, now=1_700_000_005.0)
