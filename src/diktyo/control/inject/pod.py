"""Sidecar injection into a pod (pure): Istio's policy and mutation, with diktyo's containers.

``inject_pod(pod, config)`` returns a new pod dict with the ``diktyo-init`` init container
(traffic capture rules, see ``capture``), the ``diktyo-proxy`` sidecar, their volumes, and
Istio's labels and annotations (``sidecar.istio.io/status`` marks the pod as injected). A
pod that opted out (``sidecar.istio.io/inject: "false"``), that uses the host network, or
that is already injected comes back unchanged (equal, not the same object).
"""

from __future__ import annotations

import copy
import ipaddress
import json
from typing import Any

from diktyo.control.ingest.kubernetes import port_protocol
from diktyo.control.inject.capture import CapturePlan, init_args
from diktyo.control.inject.config import DEFAULT_CONFIG, InjectConfig
from diktyo.control.inject.probes import ENV as PROBERS_ENV
from diktyo.control.inject.probes import rewrite_probes, should_rewrite

PROXY = "diktyo-proxy"
INIT = "diktyo-init"
STATUS = "sidecar.istio.io/status"
INJECT = "sidecar.istio.io/inject"
NAMESPACE_LABELS = ("istio-injection", "diktyo-injection")
VOLUMES = ("diktyo-data", "diktyo-podinfo", "diktyo-token")
_TRUE = {"true", "y", "yes", "on", "enabled"}
_FALSE = {"false", "n", "no", "off", "disabled"}
_LOG_LEVELS = {
    "trace": "debug",
    "debug": "debug",
    "info": "info",
    "warning": "warning",
    "warn": "warning",
    "error": "error",
    "critical": "error",
    "off": "error",
}


class InjectionError(ValueError):
    """The pod asks for something impossible (e.g. a bad annotation); the message says what."""


def _explicit(pod: dict[str, Any]) -> bool | None:
    """The pod's own choice: label ``sidecar.istio.io/inject`` wins over the annotation."""
    meta = pod.get("metadata") or {}
    for source in (meta.get("labels") or {}, meta.get("annotations") or {}):
        value = str(source.get(INJECT, "")).strip().lower()
        if value in _TRUE:
            return True
        if value in _FALSE:
            return False
    return None


def pod_problem(pod: Any) -> str | None:
    """What makes ``pod`` not a Pod injection can work on, or None (the API server's shapes)."""
    if not isinstance(pod, dict):
        return "the pod must be an object"
    meta = pod.get("metadata", {})
    if not isinstance(meta, dict):
        return "metadata must be an object"
    for key in ("labels", "annotations"):
        m = meta.get(key, {})
        if not isinstance(m, dict) or not all(isinstance(v, str) for v in m.values()):
            return f"metadata.{key} must map names to strings"
    for key in ("name", "generateName", "namespace"):
        if not isinstance(meta.get(key, ""), str):
            return f"metadata.{key} must be a string"
    spec = pod.get("spec")
    if not isinstance(spec, dict) or not isinstance(spec.get("containers"), list):
        return "spec.containers is missing: this is not a Pod"
    for key in ("containers", "initContainers", "volumes"):
        items = spec.get(key, [])
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            return f"spec.{key} must be a list of objects"
    for c in spec["containers"]:
        if not isinstance(c.get("name", ""), str):
            return "spec.containers[].name must be a string"
        ports = c.get("ports", [])
        if not isinstance(ports, list) or not all(
            isinstance(p, dict)
            and isinstance(p.get("containerPort"), int)
            and isinstance(p.get("name", ""), str)
            and isinstance(p.get("protocol", "TCP"), str)
            for p in ports
        ):
            return "spec.containers[].ports must be a list of {containerPort: int, name, protocol}"
    for key in ("serviceAccountName", "serviceAccount"):
        if not isinstance(spec.get(key, ""), str):
            return f"spec.{key} must be a string"
    return None


def is_injected(pod: dict[str, Any]) -> bool:
    meta = pod.get("metadata") or {}
    if STATUS in (meta.get("annotations") or {}):
        return True
    names = [c.get("name") for c in (pod.get("spec") or {}).get("containers") or []]
    return PROXY in names


def injection_required(
    pod: dict[str, Any],
    config: InjectConfig = DEFAULT_CONFIG,
    namespace: str | None = None,
    namespace_labels: dict[str, str] | None = None,
) -> tuple[bool, str]:
    """(inject?, reason). ``namespace_labels=None`` means "the webhook's selector already matched"."""
    spec = pod.get("spec") or {}
    ns = namespace or (pod.get("metadata") or {}).get("namespace") or ""
    if spec.get("hostNetwork"):
        return False, "pod uses the host network"
    if ns in config.ignored_namespaces:
        return False, f"namespace {ns} is never injected"
    if is_injected(pod):
        return False, "already injected"
    explicit = _explicit(pod)
    if explicit is False:
        return False, f"pod opted out ({INJECT}: false)"
    if namespace_labels is not None and explicit is None:
        values = [str(namespace_labels.get(k, "")).lower() for k in NAMESPACE_LABELS]
        if "enabled" not in values:
            return False, f"namespace {ns or '?'} is not labelled istio-injection=enabled"
    return True, "injected"


def _annotation(pod: dict[str, Any], key: str, default: str) -> str:
    return str(((pod.get("metadata") or {}).get("annotations") or {}).get(key, default))


def _limits(pod: dict[str, Any], prefix: str, config: InjectConfig) -> dict[str, str]:
    """The proxy's CPU/memory limits (``sidecar.istio.io/proxyCPULimit``/``proxyMemoryLimit``),
    shared by the sidecar and the init container, as Istio's injector does."""
    return {
        "cpu": _annotation(pod, prefix + "proxyCPULimit", config.cpu_limit),
        "memory": _annotation(pod, prefix + "proxyMemoryLimit", config.memory_limit),
    }


def _ports(value: str, key: str = "") -> tuple[int, ...]:
    out = []
    for part in (x.strip() for x in value.split(",")):
        if not part:
            continue
        if not (part.isascii() and part.isdigit()) or not 0 < int(part) < 65536:
            raise InjectionError(
                f"annotation {key}: {part!r} is not a port; give comma-separated "
                'port numbers, e.g. "9080,9443"'
            )
        out.append(int(part))
    return tuple(out)


def _cidrs(value: str, key: str) -> tuple[str, ...]:
    out = []
    for part in (x.strip() for x in value.split(",")):
        if not part:
            continue
        try:
            net = ipaddress.ip_network(part, strict=False)
        except ValueError:
            raise InjectionError(f"annotation {key}: {part!r} is not an IP range; give comma-separated "
                                 "CIDRs, e.g. \"10.0.0.0/8,172.16.0.0/12\"") from None
        if net.version != 4:
            raise InjectionError(f"annotation {key}: {part!r}: IPv6 ranges are not supported yet")
        out.append(str(net))
    return tuple(out)


def interception_mode(pod: dict[str, Any]) -> str:
    """``sidecar.istio.io/interceptionMode``: REDIRECT (default: the ``diktyo-init`` container
    installs the capture rules) or NONE (no init container, no capture, as Istio's template).
    TPROXY and anything else deny the pod."""
    key = "sidecar.istio.io/interceptionMode"
    mode = _annotation(pod, key, "REDIRECT").strip().upper() or "REDIRECT"
    if mode not in ("REDIRECT", "NONE"):
        raise InjectionError(f"annotation {key}: {mode!r} is not supported; use REDIRECT "
                             "(iptables NAT redirect, the default) or NONE (no capture)")
    return mode


def capture_plan(pod: dict[str, Any], config: InjectConfig) -> CapturePlan:
    """The capture rules for a pod: config defaults overridden by ``traffic.sidecar.istio.io/*``."""
    a = "traffic.sidecar.istio.io/"
    include = _annotation(pod, a + "includeInboundPorts", "*").strip()
    if include != "*":
        include = ",".join(map(str, _ports(include, a + "includeInboundPorts")))
    include_out = _annotation(pod, a + "includeOutboundIPRanges", "*").strip()
    if include_out != "*":
        include_out = ",".join(_cidrs(include_out, a + "includeOutboundIPRanges"))
    return CapturePlan(
        outbound_port=config.outbound_capture_port,
        inbound_port=config.inbound_capture_port,
        proxy_uid=config.proxy_uid,
        proxy_gid=config.proxy_uid,
        include_inbound_ports=include,
        exclude_inbound_ports=tuple(
            dict.fromkeys(
                config.exclude_inbound_ports
                + _ports(_annotation(pod, a + "excludeInboundPorts", ""), a + "excludeInboundPorts")
            )
        ),
        include_outbound_ip_ranges=include_out,
        exclude_outbound_ip_ranges=_cidrs(
            _annotation(pod, a + "excludeOutboundIPRanges", ""), a + "excludeOutboundIPRanges"
        ),
        exclude_outbound_ports=_ports(
            _annotation(pod, a + "excludeOutboundPorts", ""), a + "excludeOutboundPorts"
        ),
    )


def _pod_ports(containers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for c in containers:
        for p in c.get("ports") or []:
            entry: dict[str, Any] = {"containerPort": p.get("containerPort")}
            if p.get("name"):
                entry["name"] = p["name"]
            entry["protocol"] = p.get("protocol", "TCP")
            entry["meshProtocol"] = port_protocol(p.get("name"), None, p.get("protocol", "TCP"))
            out.append(entry)
    return out


def _canonical(meta: dict[str, Any]) -> tuple[str, str]:
    labels = meta.get("labels") or {}
    name = (
        labels.get("service.istio.io/canonical-name")
        or labels.get("app.kubernetes.io/name")
        or labels.get("app")
        or meta.get("name")
        or (meta.get("generateName") or "").rstrip("-")
        or "unknown"
    )
    rev = (
        labels.get("service.istio.io/canonical-revision")
        or labels.get("app.kubernetes.io/version")
        or labels.get("version")
        or "latest"
    )
    return str(name), str(rev)


def _concurrency_env(pod: dict[str, Any], default: int | None) -> list[dict[str, Any]]:
    """Istio's ``proxy.istio.io/config: '{"concurrency": N}'`` (else the mesh-wide default):
    the sidecar's worker processes."""
    from diktyo.core.proxy_config import annotation_concurrency

    try:
        n = annotation_concurrency((pod.get("metadata") or {}).get("annotations"))
    except ValueError as exc:
        raise InjectionError(str(exc)) from None
    n = default if n is None else n
    return [] if n is None else [{"name": "DIKTYO_CONCURRENCY", "value": str(n)}]


def _field_env(name: str, path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": path}}}


def proxy_container(
    pod: dict[str, Any], config: InjectConfig, app_probers: str = ""
) -> dict[str, Any]:
    """The ``diktyo-proxy`` sidecar container for this pod, configured by its environment
    (``diktyo.proxy.env`` reads every ``DIKTYO_*`` variable set here)."""
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    app = spec.get("containers") or []
    a = "sidecar.istio.io/"
    log_level = _LOG_LEVELS.get(
        _annotation(pod, a + "logLevel", config.log_level).lower(), "warning"
    )
    name, rev = _canonical(meta)
    return {
        "name": PROXY,
        "image": _annotation(pod, a + "proxyImage", config.image),
        "imagePullPolicy": config.image_pull_policy,
        "command": ["diktyo"],
        "args": ["sidecar"],
        "env": [
            _field_env("POD_NAME", "metadata.name"),
            _field_env("POD_NAMESPACE", "metadata.namespace"),
            _field_env("INSTANCE_IP", "status.podIP"),
            _field_env("HOST_IP", "status.hostIP"),
            _field_env("SERVICE_ACCOUNT", "spec.serviceAccountName"),
            {"name": "DIKTYO_CONTROL_PLANE", "value": config.control_plane},
            {"name": "DIKTYO_ADMIN_PORT", "value": str(config.admin_port)},
            {"name": "DIKTYO_ADMIN_ADDRESS", "value": "127.0.0.1"},  # private: probes use 15021
            {"name": "DIKTYO_STATUS_PORT", "value": str(config.status_port)},
            {"name": "DIKTYO_READINESS_PORT", "value": str(config.readiness_port)},
            {"name": "DIKTYO_LOG_LEVEL", "value": log_level},
            {"name": "DIKTYO_INTERCEPTION_MODE", "value": interception_mode(pod)},
            # state (the admin token for POST /drain) on the memory volume: the root is read-only
            {"name": "DIKTYO_HOME", "value": "/var/run/diktyo"},
            # the projected token (volume diktyo-token): the control plane's TokenReview
            {"name": "DIKTYO_KUBE_TOKEN_FILE", "value": "/var/run/secrets/tokens/diktyo-token"},
            {"name": "DIKTYO_TRUST_DOMAIN", "value": config.trust_domain},
            {"name": "DIKTYO_TRACING_SAMPLING", "value": f"{config.tracing_sampling:g}"},
            {"name": "DIKTYO_META_WORKLOAD_NAME", "value": name},
            {"name": "DIKTYO_META_CANONICAL_REVISION", "value": rev},
            {
                "name": "DIKTYO_META_APP_CONTAINERS",
                "value": ",".join(str(c.get("name", "")) for c in app),
            },
            {
                "name": "DIKTYO_META_POD_PORTS",
                "value": json.dumps(_pod_ports(app), separators=(",", ":")),
            },
        ]
        + ([{"name": PROBERS_ENV, "value": app_probers}] if app_probers else [])
        + _concurrency_env(pod, config.concurrency),
        "ports": [
            {"containerPort": config.status_port, "name": "http-dkt-status", "protocol": "TCP"}
        ],
        "readinessProbe": {
            "httpGet": {"path": "/healthz/ready", "port": config.readiness_port},
            "initialDelaySeconds": 1,
            "periodSeconds": 2,
            "timeoutSeconds": 3,
            "failureThreshold": 30,
        },
        "resources": {
            "requests": {
                "cpu": _annotation(pod, a + "proxyCPU", config.cpu_request),
                "memory": _annotation(pod, a + "proxyMemory", config.memory_request),
            },
            "limits": _limits(pod, a, config),
        },
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
            "runAsUser": config.proxy_uid,
            "runAsGroup": config.proxy_uid,
            "runAsNonRoot": True,
        },
        "volumeMounts": [
            {"name": "diktyo-data", "mountPath": "/var/run/diktyo"},
            {"name": "diktyo-podinfo", "mountPath": "/etc/diktyo/pod"},
            {"name": "diktyo-token", "mountPath": "/var/run/secrets/tokens"},
        ],
    }


def init_container(pod: dict[str, Any], config: InjectConfig) -> dict[str, Any]:
    """The ``diktyo-init`` container: ``diktyo init --apply`` installs the capture rules, then
    it exits."""
    a = "sidecar.istio.io/"
    return {
        "name": INIT,
        "image": _annotation(pod, a + "proxyImage", config.image),
        "imagePullPolicy": config.image_pull_policy,
        "command": ["diktyo"],
        "args": init_args(capture_plan(pod, config)),
        "resources": {
            "requests": {"cpu": "10m", "memory": "40Mi"},
            "limits": _limits(pod, a, config),
        },
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
            "readOnlyRootFilesystem": False,
            "runAsUser": 0,
            "runAsGroup": 0,
            "runAsNonRoot": False,
        },
    }


def _volumes() -> list[dict[str, Any]]:
    return [
        {"name": "diktyo-data", "emptyDir": {"medium": "Memory"}},
        {
            "name": "diktyo-podinfo",
            "downwardAPI": {
                "items": [
                    {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
                    {"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}},
                ]
            },
        },
        {
            "name": "diktyo-token",
            "projected": {
                "sources": [
                    {
                        "serviceAccountToken": {
                            "audience": "diktyo-ca",
                            "expirationSeconds": 43200,
                            "path": "diktyo-token",
                        }
                    }
                ]
            },
        },
    ]


def status_annotation(config: InjectConfig, capture: bool = True) -> str:
    return json.dumps(
        {
            "initContainers": [INIT] if capture else [],
            "containers": [PROXY],
            "volumes": list(VOLUMES),
            "imagePullSecrets": None,
            "revision": config.revision,
        },
        separators=(",", ":"),
    )


def inject_pod(
    pod: dict[str, Any],
    config: InjectConfig = DEFAULT_CONFIG,
    namespace: str | None = None,
    namespace_labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A copy of ``pod`` with the sidecar injected, or an unchanged copy if not required.

    Raises InjectionError for a pod of the wrong shape (see ``pod_problem``) or a bad
    annotation.
    """
    problem = pod_problem(pod)
    if problem is not None:
        raise InjectionError(problem)
    out = copy.deepcopy(pod)
    required, _ = injection_required(pod, config, namespace, namespace_labels)
    if not required:
        return out
    meta = out.setdefault("metadata", {})
    spec = out.setdefault("spec", {})
    app = spec.get("containers") or []
    name, rev = _canonical(meta)
    labels = meta.setdefault("labels", {})
    labels.setdefault("security.istio.io/tlsMode", "istio")
    labels.setdefault("service.istio.io/canonical-name", name)
    labels.setdefault("service.istio.io/canonical-revision", rev)
    ann = meta.setdefault("annotations", {})
    if app:
        ann.setdefault("kubectl.kubernetes.io/default-container", app[0].get("name", ""))
    ann.setdefault("prometheus.io/scrape", "true")
    ann.setdefault("prometheus.io/port", str(config.status_port))
    ann.setdefault("prometheus.io/path", "/stats/prometheus")
    capture = interception_mode(pod) == "REDIRECT"
    ann[STATUS] = status_annotation(config, capture)
    if capture:  # NONE: no capture rules, no init container
        spec["initContainers"] = [init_container(pod, config)] + list(spec.get("initContainers") or [])
    probers = ""
    if should_rewrite(ann, config.rewrite_app_probes):
        app, probers = rewrite_probes(list(app), capture_plan(pod, config), config.status_port)
    spec["containers"] = list(app) + [proxy_container(pod, config, probers)]
    spec["volumes"] = list(spec.get("volumes") or []) + _volumes()
    return out
