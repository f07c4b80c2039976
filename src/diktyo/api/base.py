"""Shared building blocks of the Istio schemas: the strict base model, StringMatch, Percent."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

from diktyo.core.regex import RegexError, check_re2


def check_regex(pattern: str) -> str:
    """Compile ``pattern`` with RE2 (as Istio/Envoy do); a pattern RE2 rejects is an error."""
    try:
        return check_re2(pattern)
    except RegexError as exc:
        raise ValueError(f"invalid regex: {exc}") from None


# Integer ranges as in Istio's CRDs (protobuf uint32 / int32 and explicit minimums).
UInt32 = Annotated[int, Field(ge=0, le=4294967295)]
Int32 = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]
NonNegInt = Annotated[int, Field(ge=0)]
PosInt = Annotated[int, Field(ge=1)]
HttpCode = Annotated[int, Field(ge=100, le=599)]


class IstioModel(BaseModel):
    """Strict, immutable, camelCase: unknown fields are errors, types are not coerced."""

    model_config = ConfigDict(
        extra="forbid",
        alias_generator=to_camel,
        populate_by_name=False,
        strict=True,
        frozen=True,
    )


class StringMatch(IstioModel):
    """Istio's StringMatch: exactly one of ``exact``, ``prefix``, ``regex`` (``{}`` = present)."""

    exact: str | None = None
    prefix: str | None = None
    regex: str | None = None

    @field_validator("regex")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        return None if v is None else check_regex(v)

    @model_validator(mode="after")
    def _one_of(self) -> StringMatch:
        set_ = [k for k in ("exact", "prefix", "regex") if getattr(self, k) is not None]
        if len(set_) > 1:
            raise ValueError(f"only one of exact, prefix, regex may be set, got {', '.join(set_)}")
        return self


class Percent(IstioModel):
    """A percentage ``{value: 50}`` in [0, 100]."""

    value: float = 0.0

    @field_validator("value")
    @classmethod
    def _range(cls, v: float) -> float:
        if not 0.0 <= v <= 100.0:
            raise ValueError(f"percentage {v} out of range, must be between 0 and 100")
        return v


class PortSelector(IstioModel):
    number: UInt32 | None = None


def _no_wildcards(labels: dict[str, str]) -> None:
    for key, value in labels.items():
        if not key:
            raise ValueError("key must not be empty")
        if "*" in key:
            raise ValueError("wildcard not allowed in label key match")
        if "*" in value:
            raise ValueError("wildcard not allowed in label value match")


class WorkloadSelector(IstioModel):
    """``workloadSelector: {labels: ...}`` (Sidecar, ServiceEntry)."""

    labels: dict[str, str] = Field(default_factory=dict)

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        if any("*" in value for value in v.values()):
            raise ValueError("wildcard is not supported in selector")
        return v


class LabelSelector(IstioModel):
    """``selector: {matchLabels: ...}`` (security kinds, DestinationRule.workloadSelector)."""

    match_labels: dict[str, str] = Field(default_factory=dict)

    @field_validator("match_labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        _no_wildcards(v)
        return v


class PolicyTargetReference(IstioModel):
    group: str | None = None
    kind: str
    name: str
    namespace: str | None = None

    @model_validator(mode="after")
    def _same_namespace(self) -> PolicyTargetReference:
        if self.namespace:
            raise ValueError("cross namespace referencing is not currently supported")
        if not self.kind or not self.name:
            raise ValueError("kind and name must not be empty")
        return self
