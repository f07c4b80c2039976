"""Fuzz the webhook's pure core: any JSON in -> an AdmissionReview answer or ReviewError, never a crash."""

from __future__ import annotations

import base64
import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonpatch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from diktyo.control.inject.webhook import ReviewError, WebhookStats, review_response

GOOD = json.loads((Path(__file__).parent / "testdata" / "webhook" / "deployment_pod.review.json").read_text())

scalars = st.none() | st.booleans() | st.integers(-3, 70000) | st.text(max_size=8)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
PATHS = [("request",), ("request", "object"), ("request", "object", "metadata"),
         ("request", "object", "metadata", "labels"), ("request", "object", "metadata", "annotations"),
         ("request", "object", "spec"), ("request", "object", "spec", "containers"),
         ("request", "object", "spec", "containers", 0), ("request", "object", "spec", "containers", 0, "ports"),
         ("request", "object", "spec", "volumes"), ("request", "object", "spec", "initContainers"),
         ("request", "kind"), ("request", "namespace"), ("request", "operation")]
ANNOTATIONS = ["sidecar.istio.io/inject", "sidecar.istio.io/proxyImage", "sidecar.istio.io/logLevel",
               "traffic.sidecar.istio.io/includeInboundPorts", "traffic.sidecar.istio.io/excludeOutboundPorts",
               "traffic.sidecar.istio.io/excludeInboundPorts", "traffic.sidecar.istio.io/excludeOutboundIPRanges"]


FLAGS = ["init", "--apply", "-p", "-z", "-u", "-g", "-m", "-i", "-x", "-b", "-d", "-o"]
VALUE = re.compile(r"^(\*|REDIRECT|[0-9]+(,[0-9]+)*|[0-9./]+(,[0-9./]+)*|)$")


def _set(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    doc = copy.deepcopy(doc)
    node = doc
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return doc


def _check(review: Any) -> None:
    try:
        answer = review_response(review, stats=WebhookStats())
    except ReviewError as exc:
        assert str(exc)
        return
    resp = answer["response"]
    assert resp["uid"] == review["request"]["uid"]
    if "patch" in resp:
        ops = json.loads(base64.b64decode(resp["patch"]))
        pod = jsonpatch.apply_patch(copy.deepcopy(review["request"]["object"]), ops)
        init = pod["spec"]["initContainers"][0]
        # annotations cannot smuggle flags or anything but ports/CIDRs into the root container
        assert init["command"] == ["diktyo"]
        args = init["args"]
        assert args[:2] == ["init", "--apply"] and len(args) % 2 == 0
        pairs = list(zip(args[2::2], args[3::2], strict=True))
        assert all(flag in FLAGS[2:] for flag, _ in pairs), args
        assert all(VALUE.match(value) for _, value in pairs), args


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(PATHS), values)
def test_any_field_replaced(path: tuple[Any, ...], value: Any) -> None:
    _check(_set(GOOD, path, value))


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(ANNOTATIONS), st.text(max_size=12), max_size=4))
@example({"traffic.sidecar.istio.io/includeInboundPorts": "99999"})
@example({"traffic.sidecar.istio.io/excludeOutboundPorts": "٣"})  # a non-ASCII digit
@example({"traffic.sidecar.istio.io/excludeOutboundIPRanges": "1.2.3.4/32\nRULES\nreboot"})
@example({"traffic.sidecar.istio.io/includeOutboundIPRanges": "10.0.0.0/8 -j ACCEPT"})
def test_any_annotations(annotations: dict[str, str]) -> None:
    _check(_set(GOOD, ("request", "object", "metadata", "annotations"), annotations))


@settings(max_examples=100, deadline=None)
@given(values)
def test_any_body(body: Any) -> None:
    try:
        review_response(body)
    except ReviewError:
        pass
