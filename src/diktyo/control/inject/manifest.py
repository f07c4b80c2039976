"""Kubernetes manifests: multi-document YAML in and out, and injection into workload templates.

``inject_manifest(docs, config)`` injects the sidecar into every Pod and every pod template
(Deployment, StatefulSet, DaemonSet, ReplicaSet, ReplicationController, Job, CronJob,
``List`` items) like ``istioctl kube-inject``; other objects pass through unchanged.
"""

from __future__ import annotations

import copy
import io
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.representer import SafeRepresenter

from diktyo.api.limits import check_yaml
from diktyo.control.inject.config import DEFAULT_CONFIG, InjectConfig
from diktyo.control.inject.pod import inject_pod

TEMPLATE_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "ReplicationController", "Job"}


def load_docs(text: str) -> list[Any]:
    """All non-empty documents of a (multi-document) YAML text (``ParseLimitError`` for bombs)."""
    check_yaml(text)
    return [d for d in YAML(typ="safe").load_all(io.StringIO(text)) if d is not None]


def _str(rep: SafeRepresenter, data: str) -> Any:
    style = "|" if "\n" in data and not any(ln != ln.rstrip() for ln in data.splitlines()) else None
    return rep.represent_scalar("tag:yaml.org,2002:str", data, style=style)


def dump_docs(docs: list[Any]) -> str:
    """Documents as multi-document YAML (keys in their order, multi-line strings as blocks)."""
    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style = False
    yaml.sort_base_mapping_type_on_output = False  # type: ignore[assignment]
    yaml.width = 4096
    yaml.representer.add_representer(str, _str)
    out = io.StringIO()
    yaml.dump_all(docs, out)
    return out.getvalue()


def inject_object(obj: Any, config: InjectConfig = DEFAULT_CONFIG) -> Any:
    """One Kubernetes object with its pod (template) injected; others unchanged (copied)."""
    if not isinstance(obj, dict):
        return copy.deepcopy(obj)
    kind = obj.get("kind")
    ns = (obj.get("metadata") or {}).get("namespace")
    if kind == "Pod":
        return inject_pod(obj, config, namespace=ns)
    if kind == "List":
        return {**copy.deepcopy(obj), "items": [inject_object(i, config) for i in obj.get("items") or []]}
    out = copy.deepcopy(obj)
    spec = out.get("spec") or {}
    if kind == "CronJob":
        spec = ((spec.get("jobTemplate") or {}).get("spec")) or {}
    elif kind not in TEMPLATE_KINDS:
        return out
    template = spec.get("template")
    if isinstance(template, dict):
        tmeta = template.setdefault("metadata", {})
        if not tmeta.get("name") and not tmeta.get("generateName"):
            name = (obj.get("metadata") or {}).get("name")
            probe = {**template, "metadata": {**tmeta, "generateName": f"{name}-"}} if name else template
            injected = inject_pod(probe, config, namespace=ns)
            injected["metadata"].pop("generateName", None)
        else:
            injected = inject_pod(template, config, namespace=ns)
        spec["template"] = injected
    return out


def inject_manifest(docs: list[Any], config: InjectConfig = DEFAULT_CONFIG) -> list[Any]:
    return [inject_object(d, config) for d in docs]
