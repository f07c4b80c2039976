"""Install manifests for Kubernetes: the control plane, the injector and its webhook, from Python.

``render(values, namespace)`` builds the same objects as the Helm chart in
``deploy/helm/diktyo`` (tests render both and compare), so ``diktyo install --dry-run``
needs no ``helm`` binary. The chart's templates use plain value substitution only
(``{{ .Values.a.b }}``, ``{{ .Release.Namespace }}``, ``{{ .Chart.AppVersion }}``), which
``render_chart`` implements; a template using any other Go-template feature is an error.
"""

from __future__ import annotations

import base64
import copy
import re
from pathlib import Path
from typing import Any

from diktyo.control.inject.manifest import load_docs

APP_VERSION = "0.1.0"

DEFAULT_VALUES: dict[str, Any] = {
    "image": {"repository": "diktyo/diktyo", "tag": APP_VERSION, "pullPolicy": "IfNotPresent"},
    "replicaCount": 1,
    "logLevel": "info",
    "trustDomain": "cluster.local",
    "tracing": {"sampling": 1},
    "resources": {"requests": {"cpu": "200m", "memory": "256Mi"},
                  "limits": {"cpu": "2", "memory": "1Gi"}},
    "proxy": {"logLevel": "warning",
              "resources": {"requests": {"cpu": "100m", "memory": "128Mi"},
                            "limits": {"cpu": "2000m", "memory": "1024Mi"}}},
    "webhook": {"caBundle": "", "tlsCrt": "", "tlsKey": "", "failurePolicy": "Fail",
                "timeoutSeconds": 10},
}


def values_with(overrides: list[str], base: dict[str, Any] | None = None) -> dict[str, Any]:
    """Values with ``--set``-style overrides (``image.tag=1.2``, ``replicaCount=2``) applied."""
    values = copy.deepcopy(base if base is not None else DEFAULT_VALUES)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: write KEY=VALUE, e.g. image.tag=0.2.0")
        node = values
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                raise ValueError(f"--set {key}: {part!r} is not a section of the values")  # noqa: TRY004
            node = child
        if parts[-1] not in node or isinstance(node[parts[-1]], dict):
            known = ", ".join(sorted(k for k, v in node.items() if not isinstance(v, dict)))
            raise ValueError(f"--set {key}: unknown value; known here: {known}")
        old = node[parts[-1]]
        value: Any = raw
        if isinstance(old, bool):
            value = raw.lower() in ("1", "true", "yes")
        elif isinstance(old, int | float):
            try:
                value = int(raw)
            except ValueError:
                try:
                    value = float(raw)
                except ValueError:
                    raise ValueError(f"--set {key}: {raw!r} is not a number") from None
        node[parts[-1]] = value
    return values


def merge_values(base: dict[str, Any], override: Any, where: str = "") -> dict[str, Any]:
    """``base`` deep-merged with a values file's mapping; unknown keys are errors (like a typo)."""
    if not isinstance(override, dict):
        raise ValueError(f"values{where or ''}: expected a mapping of chart values")  # noqa: TRY004
    out = copy.deepcopy(base)
    for key, value in override.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in out:
            known = ", ".join(sorted(map(str, out)))
            raise ValueError(f"values: unknown key {path!r}; known here: {known}")
        if isinstance(out[key], dict):
            out[key] = merge_values(out[key], value, path)
        elif isinstance(value, dict | list):
            raise ValueError(f"values: {path} takes a single value, not a {type(value).__name__}")  # noqa: TRY004
        else:
            out[key] = value
    return out


def _fmt(value: Any) -> str:
    """A scalar as Go's text/template prints it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _labels() -> dict[str, str]:
    return {"app": "diktyo", "app.kubernetes.io/name": "diktyo", "app.kubernetes.io/version": APP_VERSION}


def _meta(name: str, namespace: str | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespace is not None:
        meta["namespace"] = namespace
    meta["labels"] = _labels()
    return meta


def _webhook(name: str, ns: str, v: dict[str, Any], selector: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name, "admissionReviewVersions": ["v1"], "sideEffects": "None",
        "failurePolicy": v["webhook"]["failurePolicy"], "reinvocationPolicy": "Never",
        "timeoutSeconds": v["webhook"]["timeoutSeconds"],
        "clientConfig": {"service": {"name": "diktyo", "namespace": ns, "path": "/inject", "port": 443},
                         "caBundle": _fmt(v["webhook"]["caBundle"])},
        "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                   "resources": ["pods"], "scope": "Namespaced"}],
        "namespaceSelector": selector,
        "objectSelector": {"matchExpressions": [
            {"key": "sidecar.istio.io/inject", "operator": "NotIn", "values": ["false"]}]},
    }


def render(values: dict[str, Any] | None = None, namespace: str = "diktyo-system") -> list[dict[str, Any]]:
    """The chart's objects (no Namespace, no CRDs) for ``values`` in ``namespace``."""
    v = values if values is not None else DEFAULT_VALUES
    ns = namespace
    image = f"{_fmt(v['image']['repository'])}:{_fmt(v['image']['tag'])}"
    res, pres = v["resources"], v["proxy"]["resources"]
    sampling = _fmt(v["tracing"]["sampling"])
    hardening = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                 "capabilities": {"drop": ["ALL"]}}
    role = f"diktyo-{ns}"
    return [
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": _meta(role, None),
         "rules": [
             {"apiGroups": [""], "resources": ["services", "endpoints", "pods", "namespaces"],
              "verbs": ["get", "list", "watch"]},
             {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
              "verbs": ["get", "list", "watch"]},
             {"apiGroups": ["networking.istio.io", "security.istio.io", "telemetry.istio.io"],
              "resources": ["*"], "verbs": ["get", "list", "watch"]},
             {"apiGroups": ["gateway.networking.k8s.io"],
              "resources": ["gateways", "httproutes", "grpcroutes", "referencegrants"],
              "verbs": ["get", "list", "watch"]},
             {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
         ]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": _meta(role, None),
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
         "subjects": [{"kind": "ServiceAccount", "name": "diktyo", "namespace": ns}]},
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta("diktyo", ns)},
        {"apiVersion": "v1", "kind": "Secret", "metadata": _meta("diktyo-webhook-tls", ns),
         "type": "kubernetes.io/tls",
         "data": {"tls.crt": _fmt(v["webhook"]["tlsCrt"]), "tls.key": _fmt(v["webhook"]["tlsKey"])}},
        {"apiVersion": "v1", "kind": "Service", "metadata": _meta("diktyo", ns),
         "spec": {"selector": {"app": "diktyo"}, "ports": [
             {"name": "http-control", "port": 15010, "targetPort": 15010, "protocol": "TCP"},
             {"name": "https-webhook", "port": 443, "targetPort": 15017, "protocol": "TCP"}]}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta("diktyo", ns), "spec": {
            "replicas": v["replicaCount"],
            "selector": {"matchLabels": {"app": "diktyo"}},
            "template": {
                "metadata": {"labels": {"app": "diktyo", "sidecar.istio.io/inject": "false"}},
                "spec": {
                    "serviceAccountName": "diktyo",
                    "securityContext": {"runAsNonRoot": True, "runAsUser": 1337, "runAsGroup": 1337},
                    "containers": [
                        {"name": "discovery", "image": image, "imagePullPolicy": v["image"]["pullPolicy"],
                         "command": ["diktyo"],
                         "args": ["control-plane", "--host", "0.0.0.0", "--port", "15010"],
                         "env": [
                             {"name": "DIKTYO_TRUST_DOMAIN", "value": _fmt(v["trustDomain"])},
                             {"name": "DIKTYO_TRACING_SAMPLING", "value": sampling},
                             {"name": "DIKTYO_LOG_LEVEL", "value": _fmt(v["logLevel"])},
                             {"name": "POD_NAMESPACE",
                              "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}],
                         "ports": [{"name": "http-control", "containerPort": 15010, "protocol": "TCP"}],
                         "readinessProbe": {"httpGet": {"path": "/healthz", "port": 15010}, "periodSeconds": 5},
                         "resources": {
                             "requests": {k: _fmt(x) for k, x in res["requests"].items()},
                             "limits": {k: _fmt(x) for k, x in res["limits"].items()}},
                         "securityContext": hardening,
                         "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}]},
                        {"name": "injector", "image": image, "imagePullPolicy": v["image"]["pullPolicy"],
                         "command": ["python", "-m", "diktyo.control.inject.webhook"],
                         "args": ["--cert", "/etc/diktyo/webhook/tls.crt",
                                  "--key", "/etc/diktyo/webhook/tls.key", "--port", "15017",
                                  "--image", image,
                                  "--control-plane", f"http://diktyo.{ns}.svc:15010",
                                  "--trust-domain", _fmt(v["trustDomain"]),
                                  "--log-level", _fmt(v["proxy"]["logLevel"]),
                                  "--tracing-sampling", sampling,
                                  "--proxy-cpu", _fmt(pres["requests"]["cpu"]),
                                  "--proxy-memory", _fmt(pres["requests"]["memory"]),
                                  "--proxy-cpu-limit", _fmt(pres["limits"]["cpu"]),
                                  "--proxy-memory-limit", _fmt(pres["limits"]["memory"])],
                         "ports": [{"name": "https-webhook", "containerPort": 15017, "protocol": "TCP"}],
                         "readinessProbe": {"httpGet": {"path": "/ready", "port": 15017, "scheme": "HTTPS"},
                                            "periodSeconds": 5},
                         "resources": {"requests": {"cpu": "50m", "memory": "96Mi"},
                                       "limits": {"cpu": "1", "memory": "256Mi"}},
                         "securityContext": hardening,
                         "volumeMounts": [{"name": "webhook-tls", "mountPath": "/etc/diktyo/webhook",
                                           "readOnly": True}]},
                    ],
                    "volumes": [{"name": "webhook-tls", "secret": {"secretName": "diktyo-webhook-tls"}},
                                {"name": "tmp", "emptyDir": {}}],
                }}}},
        {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
         "metadata": _meta(f"diktyo-sidecar-injector-{ns}", None),
         "webhooks": [
             _webhook("namespace.sidecar-injector.diktyo.io", ns, v,
                      {"matchLabels": {"istio-injection": "enabled"}}),
             _webhook("diktyo-namespace.sidecar-injector.diktyo.io", ns, v,
                      {"matchLabels": {"diktyo-injection": "enabled"},
                       "matchExpressions": [{"key": "istio-injection", "operator": "DoesNotExist"}]}),
         ]},
    ]


def namespace_object(namespace: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": namespace, "labels": {"istio-injection": "disabled"}}}


def with_webhook_certs(values: dict[str, Any], namespace: str) -> dict[str, Any]:
    """Values with a freshly generated webhook CA and serving cert (unless already given)."""
    from diktyo.control.inject.certs import webhook_certs

    out = copy.deepcopy(values)
    wh = out["webhook"]
    if wh.get("caBundle") and wh.get("tlsCrt") and wh.get("tlsKey"):
        return out
    certs = webhook_certs("diktyo", namespace)
    wh["caBundle"] = base64.b64encode(certs.ca_pem).decode()
    wh["tlsCrt"] = base64.b64encode(certs.cert_pem).decode()
    wh["tlsKey"] = base64.b64encode(certs.key_pem).decode()
    return out


# --------------------------------------------------------------------------- chart (subset)

_ACTION = re.compile(r"{{-?\s*(.*?)\s*-?}}", re.DOTALL)
_PATH = re.compile(r"^\.(Values|Release|Chart)((?:\.[A-Za-z_][A-Za-z0-9_]*)+)$")


class ChartError(ValueError):
    """A chart template uses something outside the supported subset, or a value is missing."""


def render_template(text: str, context: dict[str, Any], name: str = "template") -> str:
    """Substitute ``{{ .Values.a.b }}``-style actions; anything else is a ChartError."""

    def sub(match: re.Match[str]) -> str:
        expr = match.group(1)
        m = _PATH.match(expr)
        if not m:
            line = text.count("\n", 0, match.start()) + 1
            raise ChartError(f"{name}:{line}: {{{{ {expr} }}}} is outside the supported template "
                             "subset (plain .Values/.Release/.Chart paths only)")
        node: Any = context[m.group(1)]
        for part in m.group(2).strip(".").split("."):
            if not isinstance(node, dict) or part not in node:
                line = text.count("\n", 0, match.start()) + 1
                raise ChartError(f"{name}:{line}: {expr} is not defined")
            node = node[part]
        if isinstance(node, dict | list):
            raise ChartError(f"{name}: {expr} is a map or list; templates take scalars only")
        return _fmt(node)

    return _ACTION.sub(sub, text)


def render_chart(chart_dir: Path, values: dict[str, Any] | None = None,
                 namespace: str = "diktyo-system", release: str = "diktyo") -> list[dict[str, Any]]:
    """Render ``templates/*.yaml`` of a chart with the subset renderer and parse the objects."""
    chart = load_docs((chart_dir / "Chart.yaml").read_text(encoding="utf-8"))[0]
    if values is None:
        values = load_docs((chart_dir / "values.yaml").read_text(encoding="utf-8"))[0]
    context = {"Values": values, "Release": {"Namespace": namespace, "Name": release},
               "Chart": {"Name": chart["name"], "Version": chart["version"], "AppVersion": chart["appVersion"]}}
    objects: list[dict[str, Any]] = []
    for path in sorted((chart_dir / "templates").glob("*.yaml")):
        text = render_template(path.read_text(encoding="utf-8"), context, path.name)
        objects += load_docs(text)
    return objects
