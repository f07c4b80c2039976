"""The CEL subset of access log filters: Istio's documented examples, Envoy's error semantics."""

from __future__ import annotations

import pytest

from diktyo.telemetry.cel import CelError, check, compile_filter

REQ = {
    "response.code": 503,
    "response.flags": "UO",
    "request.headers": {"x-debug": "true", "user-agent": "curl/8"},
    "request.path": "/api/items?x=1",
    "request.method": "GET",
    "xds.cluster_name": "outbound|80||shop",
}


@pytest.mark.parametrize(
    ("expression", "want"),
    [
        ("response.code >= 400", True),
        ("response.code >= 400 && response.code < 500", False),
        ("response.code == 503 || response.code == 504", True),
        ("request.headers['x-debug'] == 'true'", True),
        ('request.headers["X-Debug"] == "true"', True),  # header names are lower-case
        ("'x-debug' in request.headers", True),
        ("!('x-debug' in request.headers)", False),
        ("request.path.startsWith('/api')", True),
        ("request.path.matches('^/api/[a-z]+')", True),
        ("request.method in ['POST', 'PUT']", False),
        ("response.flags != '-'", True),
        ("size(request.path) > 100", False),
        # errors make the filter false (Envoy), but || / && absorb them like CEL
        ("request.headers['missing'] == 'x'", False),
        ("request.headers['missing'] == 'x' || response.code == 503", True),
        ("response.code == '503'", False),
    ],
)
def test_documented_expressions(expression: str, want: bool) -> None:
    assert compile_filter(expression)(REQ) is want


@pytest.mark.parametrize(
    ("expression", "why"),
    [
        ("response.status >= 400", "attribute 'response.status' is not supported"),
        ("response.code >=", "ends too early"),
        ("request.path.lower() == '/x'", "method lower() is not supported"),
        ("response.code > 1 ? true : false", "unexpected character '?'"),
        ("has(request.path)", "function has() is not supported"),
        ("response.code 400", "after a complete expression"),
        ("", "empty expression"),
    ],
)
def test_unsupported_expressions_are_rejected_with_a_reason(expression: str, why: str) -> None:
    with pytest.raises(CelError) as err:
        compile_filter(expression)
    assert why in str(err.value)
    assert check(expression) == str(err.value)
