"""analyze(): Telemetry fields diktyo does not apply are warned at the field, never silently."""

from __future__ import annotations

from diktyo.api import load_text
from diktyo.control.validate import analyze

TEL = """\
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: NAME, namespace: NS}
spec:
"""


def run(*docs: str) -> list:  # type: ignore[type-arg]
    result = load_text("---\n".join(docs), "in.yaml")
    assert result.ok, [str(e) for e in result.errors]
    return analyze(result.resources)


def tel(name: str, ns: str, body: str) -> str:
    return TEL.replace("NAME", name).replace("NS", ns) + body


def test_supported_telemetry_is_clean() -> None:
    assert (
        run(
            tel(
                "t",
                "istio-system",
                "  accessLogging: [{filter: {expression: 'response.code >= 500'}}]\n",
            )
        )
        == []
    )


def test_unsupported_filter_is_warned_at_the_expression() -> None:
    (p,) = run(
        tel("t", "default", "  accessLogging:\n  - filter:\n      expression: 'a ? b : c'\n")
    )
    assert p.severity == "warning" and p.field == "spec.accessLogging[0].filter.expression"
    assert "logged unfiltered" in p.message and p.line == 7


def test_second_namespace_wide_telemetry_and_unsupported_fields() -> None:
    problems = run(
        tel("a", "shop", "  tracing: [{randomSamplingPercentage: 5}]\n"),
        tel(
            "b",
            "shop",
            "  metrics:\n  - overrides:\n    - match: {customMetric: my_metric}\n"
            "    - tagOverrides: {host: {value: request.host}}\n",
        ),
        tel("c", "shop", "  targetRef: {kind: Gateway, name: gw}\n"),
    )
    messages = [(p.field, p.message) for p in problems]
    # two namespace-wide Telemetries: Istio's IST0160 on both
    assert sorted(p.resource for p in problems if p.code == "IST0160") == ["a", "b"]
    assert any(f.endswith("match.customMetric") for f, _ in messages)
    assert any(f.endswith("tagOverrides.host.value") and "request.host" in m for f, m in messages)
    assert any(f == "spec.targetRef" and "not applied" in m for f, m in messages)
