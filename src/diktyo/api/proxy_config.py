"""Istio's ``ProxyConfig`` (networking.istio.io/v1beta1): proxy settings per workload, per
namespace or mesh-wide (root namespace ``istio-system``, no selector). Like Istio, they apply
when a sidecar starts (a change needs a restart of the workload). diktyo reads
``concurrency`` (worker processes; 0 = one per core); ``environmentVariables`` and ``image``
are accepted and have no effect."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic import Field

from diktyo.api.base import IstioModel, LabelSelector


class ProxyImage(IstioModel):
    image_type: str = ""


class ProxyConfig(IstioModel):
    selector: LabelSelector | None = None
    concurrency: int | None = Field(default=None, ge=0)
    environment_variables: dict[str, str] = Field(default_factory=dict)
    image: ProxyImage | None = None


ROOT_NAMESPACE = "istio-system"  # Istio's root configuration namespace: mesh-wide resources


def concurrency_levels(
    resources: Iterable[Any], namespace: str, labels: dict[str, str]
) -> tuple[int | None, int | None, int | None]:
    """``concurrency`` set by the ProxyConfig resources that apply to a workload, per level:
    (workload: one in its namespace whose selector its labels match; namespace: its
    namespace's selector-less one; mesh: the root namespace's selector-less one). The first
    in input order wins at each level; None = not set there.

    Istio's precedence (``EffectiveProxyConfig``), lowest first: meshConfig.defaultConfig,
    mesh, namespace, the pod's ``proxy.istio.io/config`` annotation, workload."""
    found: dict[str, int] = {}
    for res in resources:
        if getattr(res, "kind", "") != "ProxyConfig":
            continue
        spec = res.spec
        if not isinstance(spec, ProxyConfig) or spec.concurrency is None:
            continue
        sel = spec.selector.match_labels if spec.selector is not None else {}
        if sel:
            if res.namespace == namespace and all(labels.get(k) == v for k, v in sel.items()):
                found.setdefault("workload", spec.concurrency)
        elif res.namespace == namespace and namespace != ROOT_NAMESPACE:
            found.setdefault("namespace", spec.concurrency)
        elif res.namespace == ROOT_NAMESPACE:
            found.setdefault("mesh", spec.concurrency)
    return found.get("workload"), found.get("namespace"), found.get("mesh")
