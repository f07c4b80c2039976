"""Loading Istio YAML: resources with positions, and errors naming file:line:col and a fix."""

from __future__ import annotations

from pathlib import Path

from diktyo.api import ConfigError, load_paths, load_text
from diktyo.api.networking import VirtualService

VS = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts:
  - reviews
  http:
  - match:
    - headers:
        end-user:
          exact: jason
    route:
    - destination:
        host: reviews
        subset: v2
    timeout: 0.5s
  - route:
    - destination:
        host: reviews
        subset: v1
      weight: 60
    - destination:
        host: reviews
        subset: v3
      weight: 40
"""


def one_error(text: str) -> ConfigError:
    result = load_text(text, "f.yaml")
    assert result.resources == []
    assert len(result.errors) == 1, [str(e) for e in result.errors]
    return result.errors[0]


def test_valid_resource_fields_and_positions() -> None:
    result = load_text(VS, "vs.yaml")
    assert result.errors == []
    (res,) = result.resources
    assert (res.kind, res.api_version, res.name, res.namespace) == (
        "VirtualService",
        "networking.istio.io/v1",
        "reviews",
        "default",
    )
    assert isinstance(res.spec, VirtualService)
    assert res.spec.http[0].timeout == 0.5
    assert res.spec.http[0].match[0].headers["end-user"].exact == "jason"
    assert res.spec.http[1].route[1].weight == 40
    assert (res.file, res.line, res.col) == ("vs.yaml", 1, 1)
    assert res.positions["spec.http[1].route[1].weight"] == (26, 7)
    assert res.positions["spec.http[0].match[0].headers.end-user.exact"] == (12, 11)
    assert res.positions["spec.http[1]"] == (18, 5)
    assert res.position("spec.http[1].route[1].nothere") == (23, 7)


def test_unknown_field_with_did_you_mean() -> None:
    err = one_error(VS.replace("    timeout: 0.5s", "    timout: 0.5s"))
    assert (err.line, err.col) == (17, 5)
    assert err.field == "spec.http[0].timout"
    assert "unknown field 'timout'" in err.message
    assert err.hint == "did you mean 'timeout'?"
    assert str(err) == (
        "f.yaml:17:5: error: spec.http[0].timout: unknown field 'timout' "
        "(hint: did you mean 'timeout'?)"
    )


def test_wrong_type() -> None:
    err = one_error(VS.replace("weight: 40", "weight: forty"))
    assert (err.line, err.field) == (26, "spec.http[1].route[1].weight")
    assert "expected an integer" in err.message and "'forty'" in err.message


def test_quoted_number_is_a_type_error_like_kubernetes() -> None:
    err = one_error(VS.replace("weight: 40", 'weight: "40"'))
    assert "expected an integer, got string" in err.message
    assert err.hint == "remove the quotes"


def test_bad_duration() -> None:
    err = one_error(VS.replace("timeout: 0.5s", "timeout: 5 seconds"))
    assert err.field == "spec.http[0].timeout" and err.line == 17
    assert "invalid duration '5 seconds'" in err.message
    assert "100ms" in err.hint


def test_number_as_duration_is_rejected() -> None:
    err = one_error(VS.replace("timeout: 0.5s", "timeout: 10"))
    assert "invalid duration 10" in err.message


def test_duplicate_key() -> None:
    err = one_error(VS.replace("    timeout: 0.5s", "    timeout: 0.5s\n    timeout: 1s"))
    assert err.line == 18 and "duplicate key 'timeout'" in err.message


def test_bad_regex_and_re2_only_constructs() -> None:
    err = one_error(VS.replace("exact: jason", "regex: 'ja(son'"))
    assert err.field == "spec.http[0].match[0].headers.end-user.regex"
    assert "invalid regex" in err.message and err.line == 12
    err = one_error(VS.replace("exact: jason", "regex: '(?!bob).*'"))
    assert "RE2" in err.message


def test_two_match_kinds_in_one_string_match() -> None:
    err = one_error(VS.replace("exact: jason", "exact: jason\n          prefix: ja"))
    assert "only one of exact, prefix, regex" in err.message


def test_missing_required_field() -> None:
    err = one_error(VS.replace("        host: reviews\n        subset: v2", "        subset: v2"))
    assert err.field == "spec.http[0].route[0].destination.host"
    assert "missing required field 'host'" in err.message
    assert err.line == 14  # the 'destination' key


def test_enum_value() -> None:
    text = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: r}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer:
      simple: ROUND_ROBINN
"""
    err = one_error(text)
    assert err.line == 8 and "invalid value 'ROUND_ROBINN'" in err.message
    assert "ROUND_ROBIN" in err.hint


def test_unknown_kind_and_api_version() -> None:
    err = one_error(
        "apiVersion: networking.istio.io/v1\nkind: VirtualServce\nmetadata: {name: x}\n"
    )
    assert err.line == 2 and "unknown kind 'VirtualServce'" in err.message
    assert "VirtualService" in err.hint
    err = one_error("apiVersion: networking.istio.io/v2\nkind: Gateway\nmetadata: {name: x}\n")
    assert err.line == 1 and "unsupported apiVersion" in err.message
    err = one_error(
        "apiVersion: security.istio.io/v1alpha3\nkind: PeerAuthentication\nmetadata: {name: x}\n"
    )
    assert "security.istio.io/v1" in err.hint


def test_non_mesh_kubernetes_kind_is_an_info_note() -> None:
    result = load_text("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\n", "d.yaml")
    assert result.ok and result.errors[0].severity == "info"
    assert "apps/v1 Deployment x" in result.errors[0].message


def test_yaml_syntax_error_keeps_other_documents() -> None:
    text = (
        VS + "---\napiVersion: v1\nkind: [unclosed\n---\n" + VS.replace("reviews\n", "ratings\n", 1)
    )
    result = load_text(text, "multi.yaml")
    assert [r.name for r in result.resources] == ["reviews", "ratings"]
    (err,) = result.errors
    assert err.line == 29 and "YAML syntax error" in err.message
    assert result.resources[1].line == 31


def test_bad_document_does_not_stop_good_ones() -> None:
    bad = VS.replace("weight: 40", "weight: x")
    result = load_text(bad + "---\n" + VS, "two.yaml")
    assert len(result.resources) == 1 and len(result.errors) == 1
    assert result.resources[0].line == 28


def test_missing_metadata_name_and_namespace_default() -> None:
    err = one_error("apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {}\n")
    assert "metadata.name" in err.message
    result = load_text(
        "apiVersion: networking.istio.io/v1\nkind: Gateway\n"
        "metadata: {name: g, namespace: istio-system}\n",
        "g",
    )
    assert result.resources[0].namespace == "istio-system"


def test_legacy_percent_and_percentage() -> None:
    text = VS.replace(
        "    timeout: 0.5s",
        "    fault:\n      delay:\n        percent: 50\n"
        "        fixedDelay: 7s\n      abort:\n        percentage: {value: 10.5}\n"
        "        httpStatus: 503",
    )
    result = load_text(text, "f")
    assert result.errors == []
    fault = result.resources[0].spec.http[0].fault  # type: ignore[attr-defined]
    assert fault.delay.percent == 50 and fault.delay.fixed_delay == 7.0
    assert fault.abort.percentage.value == 10.5
    err = one_error(text.replace("10.5", "150"))
    assert "out of range" in err.message


def test_security_kinds_and_int_map_keys() -> None:
    text = """\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: pa, namespace: foo}
spec:
  selector: {matchLabels: {app: reviews}}
  mtls: {mode: STRICT}
  portLevelMtls:
    8080: {mode: DISABLE}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny}
spec:
  action: DENY
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/default/sa/sleep"]}
    to:
    - operation: {methods: [POST], paths: ["/admin*"]}
    when:
    - key: request.headers[x-token]
      values: ["x"]
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt}
spec:
  jwtRules:
  - issuer: me
    jwksUri: http://x/jwks
    timeout: 5s
"""
    result = load_text(text, "sec.yaml")
    assert result.errors == []
    pa, ap, ra = (r.spec for r in result.resources)
    assert pa.port_level_mtls["8080"].mode == "DISABLE"  # type: ignore[attr-defined]
    assert ap.rules[0].from_[0].source.principals  # type: ignore[attr-defined]
    assert ra.jwt_rules[0].timeout == 5.0  # type: ignore[attr-defined]


def test_load_paths_dir_sorted_and_unreadable(tmp_path: Path) -> None:
    (tmp_path / "b.yaml").write_text(VS)
    (tmp_path / "a.yml").write_text(VS.replace("name: reviews", "name: first"))
    (tmp_path / "c.txt").write_text("not yaml: [")
    result = load_paths([tmp_path, tmp_path / "missing.yaml"])
    assert [r.name for r in result.resources] == ["first", "reviews"]
    (err,) = result.errors
    assert "cannot read file" in err.message and err.file.endswith("missing.yaml")


def test_integer_ranges_and_minimum_duration_follow_the_crds() -> None:
    err = one_error(VS.replace("weight: 40", "weight: 3000000000"))
    assert err.field == "spec.http[1].route[1].weight"
    assert "value 3000000000 out of range: must be <= 2147483647" in err.message
    err = one_error(
        VS.replace("        subset: v2", "        subset: v2\n        port: {number: -1}")
    )
    assert "value -1 out of range: must be >= 0" in err.message
    err = one_error(VS.replace("timeout: 0.5s", "timeout: 0s"))
    assert "must be a valid duration greater than 1ms" in err.message


SE = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ext}
spec:
  hosts: [api.example.com]
  resolution: STATIC
  ports:
  - {number: 80, name: http}
  endpoints:
  - address: 127.0.0.1
    ports: {http: 8080}
"""


def test_service_entry_rules_from_the_crd() -> None:
    assert load_text(SE, "se.yaml").errors == []
    cases = {
        "  resolution: STATIC\n": ("", "NONE mode cannot set endpoints"),
        "hosts: [api.example.com]": ("hosts: ['*']", "hostname cannot be wildcard"),
        "{number: 80, name: http}": ("{number: 70000, name: http}", "must be between 1-65535"),
        "ports: {http: 8080}": ("ports: {http: 0}", "port 0 must be between 1-65535"),
        "- address: 127.0.0.1\n": ("- labels: {a: b}\n", "Address is required"),
    }
    for old, (new, message) in cases.items():
        err = one_error(SE.replace(old, new))
        assert message in err.message, (old, str(err))
    err = one_error(
        SE.replace(
            "  - {number: 80, name: http}\n",
            "  - {number: 80, name: http}\n  - {number: 80, name: http2}\n",
        )
    )
    assert "port number cannot be duplicated" in err.message and err.field == "spec"


def test_gateway_tls_credentials_are_exclusive() -> None:
    text = """\
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 443, name: https, protocol: HTTPS}
    hosts: ["*"]
    tls: {mode: SIMPLE, credentialName: a, credentialNames: [b]}
"""
    err = one_error(text)
    assert "only one of credentialName or credentialNames can be set" in err.message
    assert err.field == "spec.servers[0].tls" and err.line == 9


def test_security_rules_from_the_crd() -> None:
    pa = (
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: pa}\n"
        "spec:\n  portLevelMtls:\n    8080: {mode: DISABLE}\n"
    )
    assert "portLevelMtls requires selector" in one_error(pa).message
    ap = (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: ap}\n"
        "spec:\n  selector: {matchLabels: {app: '*'}}\n"
    )
    assert "wildcard not allowed in label value match" in one_error(ap).message
    ap2 = ap.replace("{app: '*'}", "{app: x}") + "  targetRefs: [{kind: Gateway, name: gw}]\n"
    assert "only one of targetRefs or selector can be set" in one_error(ap2).message
    src = (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: ap}\n"
        "spec:\n  rules:\n  - from:\n    - source: {serviceAccounts: [a], principals: [b]}\n"
    )
    err = one_error(src)
    assert "Cannot set serviceAccounts with namespaces or principals" in err.message
    assert err.field == "spec.rules[0].from[0].source" and err.line == 7
    ra = (
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: ra}\n"
        "spec:\n  jwtRules:\n  - {issuer: me, jwksUri: 'ftp://x/keys'}\n"
    )
    assert "url must have scheme http:// or https://" in one_error(ra).message


def test_names_and_namespaces_follow_kubernetes_rules() -> None:
    text = "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: My_GW}\n"
    err = one_error(text)
    assert err.field == "metadata.name" and "invalid name 'My_GW'" in err.message
    assert err.hint == "e.g. 'my-gw'"
    err = one_error(text.replace("My_GW", "gw, namespace: Foo.bar"))
    assert "invalid namespace 'Foo.bar'" in err.message


def test_patterns_python_accepts_but_re2_rejects_are_errors_with_position() -> None:
    # Python's re compiles all of these; RE2 (Istio/Envoy) does not
    for bad in (r"ja\Z", "a{2000}", r"(j)a\1"):
        err = one_error(VS.replace("exact: jason", f"regex: '{bad}'"))
        assert err.field == "spec.http[0].match[0].headers.end-user.regex"
        assert (err.line, err.col) == (12, 11), (bad, err.line, err.col)
        assert str(err).startswith("f.yaml:12:11: error:")
        assert "RE2" in err.message and err.file == "f.yaml"


def test_uri_regex_rewrite_pattern_is_checked() -> None:
    text = VS.replace(
        "    timeout: 0.5s\n",
        "    timeout: 0.5s\n    rewrite:\n      uriRegexRewrite:\n        match: 'a{2000}'\n"
        "        rewrite: /x\n",
    )
    err = one_error(text)
    assert err.field == "spec.http[0].rewrite.uriRegexRewrite.match"
    assert "RE2" in err.message and (err.line, err.col) == (20, 9)
