"""Istio's telemetry.istio.io ``Telemetry`` schema (v1 and v1alpha1 are the same).

Field names, enums and rules follow Istio's CRD (``customresourcedefinitions.gen.yaml``): at
most one of ``selector``, ``targetRef``, ``targetRefs``; a tag override with ``UPSERT`` needs a
value and one with ``REMOVE`` must have none; ``randomSamplingPercentage`` in [0, 100].
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import Field, field_validator, model_validator

from diktyo.api.base import IstioModel, LabelSelector
from diktyo.api.duration import Duration

_MODE = Literal["CLIENT_AND_SERVER", "CLIENT", "SERVER"]
_METRIC = Literal[
    "ALL_METRICS",
    "REQUEST_COUNT",
    "REQUEST_DURATION",
    "REQUEST_SIZE",
    "RESPONSE_SIZE",
    "TCP_OPENED_CONNECTIONS",
    "TCP_CLOSED_CONNECTIONS",
    "TCP_SENT_BYTES",
    "TCP_RECEIVED_BYTES",
    "GRPC_REQUEST_MESSAGES",
    "GRPC_RESPONSE_MESSAGES",
]
METRICS: tuple[str, ...] = get_args(_METRIC)


class ProviderRef(IstioModel):
    name: str


class TargetRef(IstioModel):
    group: str | None = None
    kind: str
    name: str
    namespace: str | None = None

    @field_validator("namespace")
    @classmethod
    def _same_namespace(cls, v: str | None) -> str | None:
        if v:
            raise ValueError("cross namespace referencing is not currently supported")
        return v


class TracingSelector(IstioModel):
    mode: _MODE | None = None


class LiteralTag(IstioModel):
    value: str


class EnvironmentTag(IstioModel):
    name: str
    default_value: str | None = None


class HeaderTag(IstioModel):
    name: str
    default_value: str | None = None


class FormatterTag(IstioModel):
    value: str


class CustomTag(IstioModel):
    literal: LiteralTag | None = None
    environment: EnvironmentTag | None = None
    header: HeaderTag | None = None
    formatter: FormatterTag | None = None

    @model_validator(mode="after")
    def _one_of(self) -> CustomTag:
        set_ = [f for f in ("literal", "environment", "header", "formatter") if getattr(self, f)]
        if len(set_) > 1:
            raise ValueError(
                f"only one of literal, environment, header, formatter may be set, got "
                f"{', '.join(set_)}"
            )
        return self


class Tracing(IstioModel):
    match: TracingSelector | None = None
    providers: list[ProviderRef] = Field(default_factory=list)
    custom_tags: dict[str, CustomTag] = Field(default_factory=dict)
    disable_span_reporting: bool | None = None
    random_sampling_percentage: float | None = Field(default=None, ge=0.0, le=100.0)
    use_request_id_for_trace_sampling: bool | None = None
    enable_istio_tags: bool | None = None
    disable_context_propagation: bool | None = None


class MetricSelector(IstioModel):
    metric: _METRIC | None = None
    custom_metric: str | None = None
    mode: _MODE | None = None

    @model_validator(mode="after")
    def _one_of(self) -> MetricSelector:
        if self.metric is not None and self.custom_metric is not None:
            raise ValueError("only one of metric or customMetric may be set")
        return self


class TagOverride(IstioModel):
    operation: Literal["UPSERT", "REMOVE"] | None = None
    value: str | None = None

    @model_validator(mode="after")
    def _rules(self) -> TagOverride:
        # the CEL rules of Istio's CRD, with its messages
        if self.operation == "UPSERT" and not self.value:
            raise ValueError("value must be set when operation is UPSERT")
        if self.operation == "REMOVE" and self.value is not None:
            raise ValueError("value must not be set when operation is REMOVE")
        return self


class MetricsOverrides(IstioModel):
    match: MetricSelector | None = None
    disabled: bool | None = None
    tag_overrides: dict[str, TagOverride] = Field(default_factory=dict)


class Metrics(IstioModel):
    providers: list[ProviderRef] = Field(default_factory=list)
    overrides: list[MetricsOverrides] = Field(default_factory=list)
    reporting_interval: Duration | None = None


class AccessLoggingFilter(IstioModel):
    expression: str | None = None


class AccessLogging(IstioModel):
    match: TracingSelector | None = None
    providers: list[ProviderRef] = Field(default_factory=list)
    disabled: bool | None = None
    filter: AccessLoggingFilter | None = None


class Telemetry(IstioModel):
    """Tracing, metrics and access logging for the workloads it selects.

    Scope (Istio): in the root namespace (``istio-system``) without selector = the whole mesh;
    in another namespace without selector = that namespace; with ``selector`` = the matching
    workloads of its namespace. The narrower scope overrides the wider field by field.
    """

    selector: LabelSelector | None = None
    target_ref: TargetRef | None = None
    target_refs: list[TargetRef] = Field(default_factory=list, max_length=16)
    tracing: list[Tracing] = Field(default_factory=list)
    metrics: list[Metrics] = Field(default_factory=list)
    access_logging: list[AccessLogging] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_target(self) -> Telemetry:
        fields = self.model_fields_set
        if sum(f in fields for f in ("selector", "target_ref", "target_refs")) > 1:
            raise ValueError("only one of targetRefs or selector can be set")
        return self
