"""Fuzzing the loader: any text or structure gives resources or ConfigErrors, never a crash."""

from __future__ import annotations

import io
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from ruamel.yaml import YAML

from diktyo.api import load_text

HEAD = "apiVersion: networking.istio.io/v1\nkind: {kind}\nmetadata: {{name: x}}\n"
KINDS = [
    "VirtualService",
    "DestinationRule",
    "ServiceEntry",
    "Gateway",
    "Sidecar",
    "AuthorizationPolicy",
    "PeerAuthentication",
    "RequestAuthentication",
]
FIELDS = [
    "hosts",
    "http",
    "route",
    "destination",
    "host",
    "subset",
    "weight",
    "match",
    "headers",
    "exact",
    "prefix",
    "regex",
    "timeout",
    "retries",
    "attempts",
    "fault",
    "delay",
    "fixedDelay",
    "percentage",
    "value",
    "subsets",
    "name",
    "labels",
    "trafficPolicy",
    "connectionPool",
    "tcp",
    "maxConnections",
    "ports",
    "number",
    "endpoints",
    "address",
    "servers",
    "port",
    "protocol",
    "selector",
    "rules",
    "from",
]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=False),
    st.text(max_size=12),
    st.sampled_from(["1s", "0.5s", "-1s", "(", "v1", "*", "100"]),
)
values: Any = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), inner, max_size=4),
    ),
    max_leaves=20,
)


def _dump(obj: Any) -> str:
    buf = io.StringIO()
    YAML(typ="safe", pure=True).dump(obj, buf)
    return buf.getvalue()


def _check(text: str) -> None:
    result = load_text(text, "fuzz.yaml")
    for err in result.errors:
        assert err.file == "fuzz.yaml" and err.line >= 0 and err.col >= 0
        assert err.message and str(err).startswith("fuzz.yaml:")
    for res in result.resources:
        assert res.name and res.kind


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(KINDS), spec=values)
def test_random_specs_never_crash(kind: str, spec: Any) -> None:
    _check(HEAD.format(kind=kind) + _dump({"spec": spec}))


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet="ab:- \n\t{}[]'\"#&*!|>%@`,?", max_size=80))
@example("a: 1\na: 2\n")
@example("--- !tag\n---\n...\n")
@example("a: &x {b: 1}\nc: *x\nd:\n  <<: *x\n")
def test_random_text_never_crashes(text: str) -> None:
    _check(text)
    _check(HEAD.format(kind="VirtualService") + "spec:\n" + text)
