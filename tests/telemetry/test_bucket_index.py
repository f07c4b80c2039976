"""``istio_metrics.bucket_index`` (the histogram bucket of a request, issue 11, `sat`) is
``bisect_left`` over the bounds: every value, bounds and edge gives the same index."""

from __future__ import annotations

from bisect import bisect_left

from hypothesis import given
from hypothesis import strategies as st

from diktyo.telemetry.istio_metrics import bucket_index

ENVOY_DURATION_MS = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000,
                     60000, 300000, 600000, 1800000, 3600000)  # fmt: skip


def test_edges_of_envoys_default_buckets() -> None:
    bounds = tuple(float(b) for b in ENVOY_DURATION_MS)
    for x in (0.0, 0.25, 0.5, 0.5000001, 1.0, 7.0, 3600000.0, 3600001.0, 1e12):
        assert bucket_index(bounds, x) == bisect_left(bounds, x), x
    assert bucket_index(bounds, 0.5) == 0  # a value equal to a bound is in that bucket (le)
    assert bucket_index(bounds, 1e12) == len(bounds)  # +Inf
    assert bucket_index((), 3.0) == 0


@given(
    st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), max_size=25).map(
        lambda xs: tuple(sorted(set(xs)))
    ),
    st.one_of(st.floats(allow_nan=False), st.integers(0, 2**40).map(float)),
)
def test_same_as_bisect_left(bounds: tuple[float, ...], x: float) -> None:
    assert bucket_index(bounds, x) == bisect_left(bounds, x)
