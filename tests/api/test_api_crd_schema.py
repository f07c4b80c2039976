"""Every property Istio's CRDs define for the supported kinds is accepted by diktyo's models."""

from __future__ import annotations

import types
import typing
from typing import Any

import pytest
from pydantic import BaseModel

from diktyo.api import KINDS
from diktyo.api.loader import _unwrap

_PY_TYPES = {"string": (str,), "integer": (int,), "number": (float,), "boolean": (bool,)}


def _crds(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """kind -> its CRD (``istio_crd_docs``: the file parsed once per session, tests/conftest.py)"""
    return {
        doc["spec"]["names"]["kind"]: doc
        for doc in docs
        if doc.get("kind") == "CustomResourceDefinition"
    }


def _int_bounds(tp: Any) -> tuple[int | None, int | None]:
    """(ge, le) declared on an integer field type (``Annotated[int, Field(ge=.., le=..)]``)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0] if len(args) == 1 else tp
    ge = le = None
    if typing.get_origin(tp) is typing.Annotated:
        for meta in typing.get_args(tp)[1:]:
            for m in [meta, *getattr(meta, "metadata", [])]:
                ge = getattr(m, "ge", ge)
                le = getattr(m, "le", le)
    return ge, le


_INT32 = (-(2**31), 2**31 - 1)


def _walk(schema: dict[str, Any], tp: Any, path: str, problems: list[str]) -> None:
    if schema.get("type") == "integer":
        want = (schema.get("minimum"), schema.get("maximum"))
        if want == (None, None) and schema.get("format") == "int32":
            want = _INT32
        got = _int_bounds(tp)
        if want != (None, None) and got != want:
            problems.append(f"{path}: CRD integer range {want}, model {got}")
    tp = _unwrap(tp)
    stype = schema.get("type")
    if "enum" in schema and stype == "string":
        args = set(typing.get_args(tp))
        missing = [v for v in schema["enum"] if v not in args]
        if missing:
            problems.append(f"{path}: enum values {missing} not accepted (model: {tp})")
        return
    if stype == "object" and "properties" in schema:
        if not (isinstance(tp, type) and issubclass(tp, BaseModel)):
            problems.append(f"{path}: CRD object but model type {tp}")
            return
        # pydantic moves Annotated metadata of non-optional fields into FieldInfo.metadata
        by_alias = {
            (f.alias or n): typing.Annotated[f.annotation, *f.metadata]
            if f.metadata
            else f.annotation
            for n, f in tp.model_fields.items()
        }
        required = {(f.alias or n) for n, f in tp.model_fields.items() if f.is_required()}
        crd_required = set(schema.get("required", []))
        for extra in required - crd_required:
            problems.append(f"{path}.{extra}: required by diktyo but optional in the CRD")
        for name, sub in schema["properties"].items():
            if name not in by_alias:
                problems.append(f"{path}.{name}: missing in {tp.__name__}")
                continue
            _walk(sub, by_alias[name], f"{path}.{name}", problems)
        return
    if stype == "object" and "additionalProperties" in schema:
        if typing.get_origin(tp) is not dict:
            problems.append(f"{path}: CRD map but model type {tp}")
            return
        _walk(schema["additionalProperties"], typing.get_args(tp)[1], f"{path}.*", problems)
        return
    if stype == "array":
        if typing.get_origin(tp) is not list:
            problems.append(f"{path}: CRD array but model type {tp}")
            return
        _walk(schema.get("items", {}), typing.get_args(tp)[0], f"{path}[]", problems)
        return
    if stype in _PY_TYPES:
        # durations are strings in the CRD and floats (seconds) in the model
        if isinstance(tp, type) and issubclass(tp, _PY_TYPES[stype]):
            return
        if stype == "string" and tp is float:
            return
        if stype == "integer" and tp is int:
            return
        problems.append(f"{path}: CRD {stype} but model type {tp}")


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_models_accept_every_crd_property(kind: str, istio_crd_docs: list[dict[str, Any]]) -> None:
    crd = _crds(istio_crd_docs)[kind]
    group, versions, model = KINDS[kind]
    assert crd["spec"]["group"] == group
    crd_versions = {v["name"] for v in crd["spec"]["versions"]}
    assert set(versions) == crd_versions
    problems: list[str] = []
    for version in crd["spec"]["versions"]:
        spec_schema = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
        _walk(spec_schema, model, f"{kind}/{version['name']}.spec", problems)
    assert not problems, "\n".join(problems)
