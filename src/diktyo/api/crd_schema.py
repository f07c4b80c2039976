"""Structural checks of a spec against an Istio CRD's OpenAPI v3 schema (for unimplemented kinds).

Kinds diktyo recognises but does not implement (EnvoyFilter, WasmPlugin, Telemetry, ...) are
ignored, but a document Kubernetes would refuse should still be refused: ``validate(spec,
schema)`` applies the structural parts of the schema the API server applies with strict field
validation (``kubectl apply`` since Kubernetes 1.27): types, unknown fields (unless
``x-kubernetes-preserve-unknown-fields``), ``required``, ``enum``, ``minimum``/``maximum``,
``minLength``/``maxLength``, ``maxItems``, ``maxProperties``, ``pattern`` and the
``oneOf``/``anyOf`` groups Istio's CRDs use for "only one of". The CEL rules
(``x-kubernetes-validations``) are not evaluated. The schemas are Istio's, shipped in
``schemas/istio-unimplemented.json`` (``python -m diktyo.api.crd_schema CRDS.yaml`` writes it).
"""

from __future__ import annotations

import json
import re
import sys
from functools import cache
from pathlib import Path
from typing import Any

_FILE = Path(__file__).with_name("schemas") / "istio-unimplemented.json"
_INT_FORMATS = {"int32": (-(2**31), 2**31 - 1), "uint32": (0, 2**32 - 1)}


@cache
def schemas() -> dict[str, dict[str, Any]]:
    """kind -> version -> spec schema (empty when the file is missing)."""
    try:
        return dict(json.loads(_FILE.read_text(encoding="utf-8")))
    except FileNotFoundError:
        return {}


def spec_schema(kind: str, version: str) -> dict[str, Any] | None:
    return schemas().get(kind, {}).get(version)


def validate(value: Any, schema: dict[str, Any], path: str = "spec") -> list[tuple[str, str]]:
    """Problems as ``(field path, message)``, at most one per field."""
    out: list[tuple[str, str]] = []
    _check(value, schema, path, out)
    return out


def _type_ok(value: Any, stype: str | None) -> bool:
    if stype is None:
        return True
    if stype == "object":
        return isinstance(value, dict)
    if stype == "array":
        return isinstance(value, list)
    if stype == "string":
        return isinstance(value, str)
    if stype == "boolean":
        return isinstance(value, bool)
    if stype == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if stype == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    return True


def _check(value: Any, schema: dict[str, Any], path: str, out: list[tuple[str, str]]) -> None:
    if value is None:
        if not schema.get("nullable"):
            out.append((path, "must not be null"))
        return
    stype = schema.get("type")
    if not _type_ok(value, stype):
        out.append((path, f"expected {stype}, got {type(value).__name__} {value!r}"))
        return
    if "enum" in schema and value not in schema["enum"]:
        out.append((path, f"invalid value {value!r}: must be one of {', '.join(schema['enum'])}"))
        return
    if isinstance(value, str):
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            out.append((path, f"at most {schema['maxLength']} characters"))
        elif "minLength" in schema and len(value) < schema["minLength"]:
            out.append((path, f"at least {schema['minLength']} character(s)"))
        elif "pattern" in schema and not _matches(schema["pattern"], value):
            out.append((path, f"{value!r} does not match {schema['pattern']!r}"))
        return
    if isinstance(value, int | float) and not isinstance(value, bool):
        low, high = _INT_FORMATS.get(schema.get("format", ""), (None, None))
        low = schema.get("minimum", low)
        high = schema.get("maximum", high)
        if (low is not None and value < low) or (high is not None and value > high):
            out.append((path, f"value {value} out of range [{low}, {high}]"))
        return
    if isinstance(value, list):
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            out.append((path, f"at most {schema['maxItems']} items"))
        items = schema.get("items")
        if items:
            for i, item in enumerate(value):
                _check(item, items, f"{path}[{i}]", out)
        return
    if isinstance(value, dict):
        _check_object(value, schema, path, out)


def _check_object(
    value: dict[str, Any], schema: dict[str, Any], path: str, out: list[tuple[str, str]]
) -> None:
    if "maxProperties" in schema and len(value) > schema["maxProperties"]:
        out.append((path, f"at most {schema['maxProperties']} entries"))
    for key in schema.get("required", []):
        if key not in value:
            out.append((f"{path}.{key}", f"missing required field {key!r}"))
    for group in ("oneOf", "anyOf"):
        if group in schema and not _one_of_ok(value, schema[group], group):
            names = sorted({k for alt in schema[group] for k in alt.get("required", [])})
            out.append((path, f"only one of {', '.join(names)} may be set"))
    props = schema.get("properties")
    extra = schema.get("additionalProperties")
    for key, sub in value.items():
        sub_path = f"{path}.{key}"
        if props is not None and key in props:
            _check(sub, props[key], sub_path, out)
        elif isinstance(extra, dict):
            _check(sub, extra, sub_path, out)
        elif props is not None and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out.append((sub_path, f"unknown field {key!r}"))


def _one_of_ok(value: dict[str, Any], alternatives: list[dict[str, Any]], group: str) -> bool:
    """Istio's CRDs express "at most one of a, b" as oneOf/anyOf of ``not anyOf required`` and
    ``required`` alternatives; only those shapes are evaluated."""
    hits = 0
    for alt in alternatives:
        if "required" in alt:
            ok = all(k in value for k in alt["required"])
        elif "not" in alt and "anyOf" in alt["not"]:
            ok = not any(
                all(k in value for k in a.get("required", [])) for a in alt["not"]["anyOf"]
            )
        else:
            return True  # a shape this checker does not know: do not judge
        hits += ok
    return hits == 1 if group == "oneOf" else hits >= 1


@cache
def _compiled(pattern: str) -> re.Pattern[str] | None:
    try:
        return re.compile(pattern)
    except re.error:
        return None


def _matches(pattern: str, value: str) -> bool:
    rx = _compiled(pattern)
    return rx is None or rx.search(value) is not None


def _strip(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [_strip(v) for v in node]
    return node


def extract(crds_text: str, kinds: set[str]) -> dict[str, dict[str, Any]]:
    """kind -> version -> spec schema (descriptions dropped) from Istio's CRD YAML."""
    from ruamel.yaml import YAML

    out: dict[str, dict[str, Any]] = {}
    for doc in YAML(typ="safe").load_all(crds_text):
        if not doc or doc.get("kind") != "CustomResourceDefinition":
            continue
        kind = doc["spec"]["names"]["kind"]
        if kind not in kinds:
            continue
        for version in doc["spec"]["versions"]:
            spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
            out.setdefault(kind, {})[version["name"]] = _strip(spec)
    return out


def main(argv: list[str]) -> int:
    """``python -m diktyo.api.crd_schema CRDS.yaml``: rewrite the shipped schema file."""
    from diktyo.api.kinds import KIND_TABLE

    if len(argv) != 1:
        print("usage: python -m diktyo.api.crd_schema customresourcedefinitions.gen.yaml")
        return 2
    kinds = {r.kind for r in KIND_TABLE if r.model is None and r.group.endswith("istio.io")}
    data = extract(Path(argv[0]).read_text(encoding="utf-8"), kinds)
    _FILE.write_text(json.dumps(data, indent=None, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {_FILE} ({', '.join(sorted(data))})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
