"""analyze(): cross-resource problems with Istio codes, file:line:col, level and a hint."""

from __future__ import annotations

from pathlib import Path

from diktyo.api import load_text
from diktyo.control.validate import Finding, analyze, registry_for_hosts

DR = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"""


def run(text: str, hosts: list[str] | None = None) -> list[Finding]:
    result = load_text(text, "in.yaml")
    assert [str(e) for e in result.errors] == []
    return analyze(result.resources, registry_for_hosts(hosts) if hosts else None)


def vs(http: str, name: str = "reviews", hosts: str = "[reviews]") -> str:
    return (
        f"apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {name}}}\n"
        f"spec:\n  hosts: {hosts}\n  http:\n{http}"
    )


def test_clean_config_has_no_problems() -> None:
    text = vs("  - route:\n    - destination: {host: reviews, subset: v1}\n") + "---\n" + DR
    assert run(text, ["reviews"]) == []


def test_undefined_subset_is_an_error_at_the_subset() -> None:
    text = vs("  - route:\n    - destination: {host: reviews, subset: v3}\n") + "---\n" + DR
    (p,) = run(text)
    assert p.severity == "error" and (p.line, p.field) == (
        8,
        "spec.http[0].route[0].destination.subset",
    )
    assert p.code == "IST0101" and p.origin == "VirtualService default/reviews"
    assert p.message == 'Referenced host+subset in destinationrule not found: "reviews+v3"'
    assert p.hint == "subsets defined for reviews.default.svc.cluster.local: v1, v2"


def test_subset_without_any_destination_rule() -> None:
    (p,) = run(vs("  - route:\n    - destination:\n        host: reviews\n        subset: v1\n"))
    assert (p.line, p.col) == (10, 9) and p.field.endswith(".subset")
    assert "add a DestinationRule for reviews" in p.hint


def test_unknown_host_is_checked_only_with_a_registry() -> None:
    text = vs("  - route:\n    - destination: {host: reviewz}\n")
    assert run(text) == []
    (p,) = run(text, ["reviews"])
    assert (p.code, p.severity) == ("IST0101", "error")
    assert p.message == 'Referenced host not found: "reviewz"'
    assert p.hint == "did you mean 'reviews'?"


def test_service_entry_hosts_form_the_registry() -> None:
    se = (
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: ext}\n"
        "spec:\n  hosts: [api.example.com]\n  resolution: STATIC\n"
        "  ports: [{number: 80, name: http, protocol: HTTP}]\n  endpoints: [{address: 127.0.0.1}]\n---\n"
    )
    text = se + vs(
        "  - route:\n    - destination: {host: api.example.com}\n    - destination: {host: apx.example.com}\n"
        "      weight: 100\n",
        hosts="[api.example.com]",
    )
    (p,) = run(text)
    assert p.code == "IST0101" and p.message == 'Referenced host not found: "apx.example.com"'
    assert p.hint == "did you mean 'api.example.com'?"
    assert p.line == 18 and p.field == "spec.http[0].route[1].destination.host"


def test_weights_not_summing_to_100() -> None:
    text = (
        vs(
            "  - route:\n    - destination: {host: reviews, subset: v1}\n      weight: 60\n"
            "    - destination: {host: reviews, subset: v2}\n      weight: 30\n"
        )
        + "---\n"
        + DR
    )
    (p,) = run(text)
    assert (p.code, p.severity, p.field) == ("DKT0102", "error", "spec.http[0].route")
    assert "weights sum to 90 (60, 30), not 100" in p.message


def test_rule_after_catch_all_is_unreachable() -> None:
    text = (
        vs(
            "  - route:\n    - destination: {host: reviews, subset: v1}\n"
            "  - match:\n    - headers: {end-user: {exact: jason}}\n"
            "    route:\n    - destination: {host: reviews, subset: v2}\n"
        )
        + "---\n"
        + DR
    )
    (p,) = run(text)
    assert (p.code, p.severity, p.line, p.field) == ("IST0130", "warning", 9, "spec.http[1]")
    assert p.message == ("VirtualService rule #1 not used (a prior rule matches every request).")
    assert "http[0] above matches every request" in p.hint


def test_prefix_slash_is_a_catch_all_and_duplicate_match_is_ineffective() -> None:
    text = vs(
        "  - match: [{uri: {prefix: /api}}]\n    route:\n    - destination: {host: reviews}\n"
        "  - match: [{uri: {prefix: /api}}]\n    route:\n    - destination: {host: reviews}\n"
        "  - match: [{uri: {prefix: /}}]\n    route:\n    - destination: {host: reviews}\n"
        "  - route:\n    - destination: {host: reviews}\n"
    )
    problems = run(text)
    # as Istio: the repeated match (IST0131), and the rule whose every match is repeated
    # (IST0130); diktyo adds the rule after the 'prefix: /' catch-all (IST0130)
    assert [(p.code, p.level, p.field) for p in problems] == [
        ("IST0130", "Warning", "spec.http[1]"),
        ("IST0131", "Info", "spec.http[1].match[0]"),
        ("IST0130", "Warning", "spec.http[3]"),
    ]
    assert problems[0].message == (
        "VirtualService rule #1 not used (all matches used by prior rules)."
    )
    assert problems[1].message == (
        "VirtualService rule #1 match #0 is not used (duplicate/overlapping match in rule #0)."
    )
    assert "http[2] above matches every request" in problems[2].hint


def test_rewrite_with_redirect() -> None:
    text = vs("  - redirect: {uri: /new}\n    rewrite: {uri: /x}\n")
    (p,) = run(text)
    assert (p.code, p.severity, p.field) == ("IST0106", "error", "spec.http[0].rewrite")
    assert "rewrite may not be used with redirect" in p.message


def test_conflicting_destination_rules() -> None:
    other = DR.replace("name: reviews", "name: reviews-cb").replace(
        "  subsets:", "  trafficPolicy:\n    connectionPool: {tcp: {maxConnections: 1}}\n  subsets:"
    )
    problems = run(DR + "---\n" + other)
    assert [(p.code, p.severity) for p in problems] == [
        ("DKT0103", "warning"),
        ("DKT0103", "error"),
    ]
    assert "only the first rule's trafficPolicy applies" in problems[0].message
    assert "subset(s) v1, v2 defined in both" in problems[1].message
    assert "DestinationRule default/reviews at in.yaml:1" in problems[1].message
    assert problems[1].line == 17  # the second rule's 'subsets' key


def test_same_name_twice_and_second_vs_for_a_host() -> None:
    one = vs("  - route:\n    - destination: {host: reviews}\n")
    problems = run(one + "---\n" + one + "---\n" + one.replace("name: reviews", "name: other"))
    # copies of one resource are one resource (DKT0101), but each of them conflicts with
    # the other VirtualService for the host: IST0109 on every one involved, as Istio does
    assert [(p.code, p.line, p.resource) for p in problems] == [
        ("IST0109", 3, "reviews"),
        ("DKT0101", 12, "reviews"),
        ("IST0109", 12, "reviews"),
        ("IST0109", 21, "other"),
    ]
    assert "already defined at in.yaml:1" in problems[1].message
    assert "The VirtualServices default/reviews,default/other associated with mesh gateway" in (
        problems[0].message
    )
    assert "*/reviews.default.svc.cluster.local" in problems[0].message


def test_missing_gateway_is_reported_twice_like_istio() -> None:
    text = vs("  - delegate: {name: x}\n", hosts="[shop.example.com]\n  gateways: [missing-gw]")
    problems = run(text)
    assert [(p.code, p.level) for p in problems] == [
        ("IST0101", "Error"),
        ("IST0132", "Warning"),
        ("DKT0107", "Warning"),
    ]
    assert problems[0].message == 'Referenced gateway not found: "missing-gw"'
    assert problems[1].message == (
        "one or more host [shop.example.com] defined in VirtualService default/reviews not "
        "found in Gateway default/missing-gw."
    )
    assert "delegate VirtualService default/x not found" in problems[2].message


def test_istio_bookinfo_reviews_and_rules_are_clean_together() -> None:
    text = vs(
        "  - match:\n    - headers: {end-user: {exact: jason}}\n"
        "    route:\n    - destination: {host: reviews, subset: v2}\n"
        "  - route:\n    - destination: {host: reviews, subset: v1}\n      weight: 50\n"
        "    - destination: {host: reviews, subset: v2}\n      weight: 50\n"
    )
    assert run(text + "---\n" + DR, ["reviews"]) == []


def test_fault_without_percentage_warns() -> None:
    (p,) = run(
        vs(
            "  - fault:\n      abort: {httpStatus: 500}\n    route:\n    - destination: {host: reviews}\n"
        )
    )
    assert (p.code, p.severity, p.field) == ("DKT0104", "warning", "spec.http[0].fault.abort")
    assert "never injected" in p.message and "percentage" in p.hint


def test_wildcard_host_on_the_mesh_and_weight_range() -> None:
    problems = run(
        vs("  - route:\n    - destination: {host: reviews}\n      weight: 120\n", hosts="['*']")
    )
    assert [(p.code, p.field) for p in problems] == [
        ("IST0106", "spec.hosts[0]"),
        ("DKT0102", "spec.http[0].route[0].weight"),
    ]
    assert "wildcard host * is not allowed" in problems[0].message
    assert "weight 120 must be between 0 and 100" in problems[1].message


def test_sidecar_parts_not_applied_are_reported() -> None:
    text = (
        "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: s}\nspec:\n"
        "  egress: [{hosts: ['./*']}]\n  outboundTrafficPolicy: {mode: REGISTRY_ONLY}\n"
    )
    (p,) = run(text)
    assert (p.code, p.severity, p.field, p.line) == (
        "DKT0105",
        "warning",
        "spec.outboundTrafficPolicy",
        6,
    )


def test_sidecar_egress_host_needs_a_namespace() -> None:
    text = (
        "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: s}\nspec:\n"
        "  egress:\n  - hosts: [reviews.default.svc.cluster.local]\n"
    )
    (p,) = run(text)
    assert (p.code, p.severity, p.field) == ("IST0106", "error", "spec.egress[0].hosts[0]")
    assert "namespace/dnsName" in p.message and "*/reviews" in p.hint


def test_checks_written_before_the_catalogue_still_report() -> None:
    from diktyo.control.validate.context import Context

    ctx = Context.build(
        load_text(vs("  - route:\n    - destination: {host: reviews}\n"), "in.yaml").resources, None
    )
    (res,) = ctx.resources
    ctx.report(res, "spec.http[0]", "something diktyo-only", "fix it", "warning")
    (p,) = ctx.problems
    assert (p.code, p.level, p.line, p.origin) == (
        "DKT0100",
        "Warning",
        7,
        "VirtualService default/reviews",
    )
    assert str(p) == (
        "Warning [DKT0100] (VirtualService default/reviews in.yaml:7:5) something diktyo-only "
        "(hint: fix it)"
    )


def test_origin_of_a_load_error_is_the_document_around_its_line(tmp_path: Path) -> None:
    from diktyo.control.validate.origin import origin_of

    f = tmp_path / "two.yaml"
    f.write_text(
        "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: gw}\n"
        "spec: {servers: []}\n---\n"
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\n"
        "metadata:\n  name: reviews\n  namespace: shop\nspec:\n  hosts: [reviews]\n"
        "  htp: []\n---\nkind: [broken\n"
    )
    assert origin_of(str(f), 2) == ("Gateway", "default", "gw")
    assert origin_of(str(f), 13) == ("VirtualService", "shop", "reviews")
    assert origin_of(str(f), 15) is None  # not YAML: no origin
    assert origin_of(str(tmp_path / "missing.yaml"), 1) is None
