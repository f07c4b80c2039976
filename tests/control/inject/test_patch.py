"""json_patch (RFC 6902): applying the patch to the original gives the mutated value."""

from __future__ import annotations

import copy
from typing import Any

import jsonpatch
from hypothesis import given, settings
from hypothesis import strategies as st

from diktyo.control.inject.patch import json_patch
from diktyo.control.inject.pod import inject_pod

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=3),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(["a", "b/c", "~d", "e"]), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(json_values, json_values)
def test_patch_round_trip(a: Any, b: Any) -> None:
    ops = json_patch(a, b)
    assert jsonpatch.apply_patch(copy.deepcopy(a), ops) == b


def test_equal_values_give_no_ops() -> None:
    assert json_patch({"a": [1, {"b": 2}]}, {"a": [1, {"b": 2}]}) == []


def test_escaping_and_append() -> None:
    ops = json_patch({"metadata": {"annotations": {}}, "l": [1]},
                     {"metadata": {"annotations": {"sidecar.istio.io/status": "x"}}, "l": [1, 2]})
    assert ops == [
        {"op": "add", "path": "/metadata/annotations/sidecar.istio.io~1status", "value": "x"},
        {"op": "add", "path": "/l/-", "value": 2},
    ]


def test_prepend_keeps_existing_items() -> None:
    ops = json_patch({"l": [{"name": "migrate"}]}, {"l": [{"name": "init"}, {"name": "migrate"}]})
    assert ops == [{"op": "add", "path": "/l/0", "value": {"name": "init"}}]


def test_injection_patch_applies() -> None:
    pod = {"metadata": {"name": "p"}, "spec": {"initContainers": [{"name": "m", "image": "m"}],
                                               "containers": [{"name": "a", "image": "a"}]}}
    out = inject_pod(pod)
    ops = json_patch(pod, out)
    assert jsonpatch.apply_patch(copy.deepcopy(pod), ops) == out
    assert not any(op["op"] in ("remove", "replace") for op in ops)
