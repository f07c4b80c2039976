"""Microbenchmark of the metrics hot path: ``python -m diktyo.telemetry._bench`` prints ns per call."""

from __future__ import annotations

import time

from diktyo.telemetry.istio_metrics import IstioMetrics, PeerLabels, WorkloadInfo
from diktyo.telemetry.stats import CLUSTER_STATS


def bench(n: int = 1_000_000) -> dict[str, float]:
    m = IstioMetrics()
    me = WorkloadInfo.from_labels(
        "productpage-v1", "default", {"app": "productpage", "version": "v1"}
    )
    peers = [
        m.peer(
            PeerLabels.build(
                "source",
                me,
                WorkloadInfo.from_labels(
                    f"reviews-v{i}", "default", {"app": "reviews", "version": f"v{i}"}
                ),
                "reviews.default.svc.cluster.local",
            )
        )
        for i in range(1, 4)
    ]
    codes = [200] * 97 + [503, 500, 404]
    durs = [0.3, 2.0, 7.5, 40.0, 120.0, 900.0]
    # precomputed argument rows so the loop measures record(), not argument building
    rows = [(peers[i % 3], codes[i % 100], "-", durs[i % 6], 0, 1200 + i % 7) for i in range(1000)]
    rec = m.record
    out: dict[str, float] = {}
    loops = n // len(rows)
    t0 = time.perf_counter_ns()
    for _ in range(loops):
        for p, c, f, d, q, r in rows:  # noqa: B007  # the unpacking alone is measured
            pass
    empty = time.perf_counter_ns() - t0
    t0 = time.perf_counter_ns()
    for _ in range(loops):
        for p, c, f, d, q, r in rows:
            rec(p, c, f, d, q, r)
    total = time.perf_counter_ns() - t0
    out["record_ns"] = (total - empty) / (loops * len(rows))
    block = CLUSTER_STATS.block()  # what Stats.cluster_stats(name) returns
    t0 = time.perf_counter_ns()
    for _ in range(loops):
        for _row in rows:
            block["upstream_rq_retry"] += 1
    total = time.perf_counter_ns() - t0
    out["counter_inc_ns"] = (total - empty) / (loops * len(rows))
    t0 = time.perf_counter_ns()
    buf: list[str] = []
    m.collect(buf)
    out["scrape_us"] = (time.perf_counter_ns() - t0) / 1000
    out["series"] = sum(1 for _ in m._series())
    return out


def main(repeats: int = 5) -> None:
    """Best and median of ``repeats`` runs (the best is the least disturbed by other load)."""
    runs = [bench(300_000) for _ in range(repeats)]

    def fmt(key: str) -> str:
        vals = sorted(r[key] for r in runs)
        return f"best {vals[0]:.0f}, median {vals[len(vals) // 2]:.0f}"

    print(f"IstioMetrics.record: {fmt('record_ns')} ns per call")
    print(f"cluster block += 1:  {fmt('counter_inc_ns')} ns per call")
    print(f"scrape (render {int(runs[0]['series'])} HTTP series): {fmt('scrape_us')} us")


if __name__ == "__main__":
    main()
