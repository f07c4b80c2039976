"""Rewriting the app's probes for the sidecar, as Istio's injector does (``rewriteAppHTTPProbers``).

With capture on, the kubelet's probes of the app would go through the sidecar's inbound path
(and fail under STRICT mTLS: the kubelet has no mesh certificate). So each app container's
``readinessProbe``, ``livenessProbe`` and ``startupProbe`` of type ``httpGet`` or
``tcpSocket`` or ``grpc`` becomes an ``httpGet`` of ``/app-health/<container>/readyz|livez|startupz`` on
the sidecar's status port (15020), and the original probe goes to the sidecar in
``DIKTYO_KUBE_APP_PROBERS``, in Istio's ``ISTIO_KUBE_APP_PROBERS`` JSON format::

    {"/app-health/web/readyz": {"httpGet": {"path": "/ready", "port": 8080, "scheme": "HTTP"},
                                "timeoutSeconds": 1}}

Named ports are resolved against the container's ports (a name that does not resolve leaves
that probe alone: the kubelet fails it exactly as it would without the mesh). ``HTTPS``
probes become ``HTTP`` towards the sidecar, which calls the app over TLS; ``grpc`` probes
become the sidecar's gRPC health check. Probes on ports that are not captured
(``traffic.sidecar.istio.io/excludeInboundPorts`` or outside ``includeInboundPorts``) and
``exec`` probes are left alone. The pod annotation
``sidecar.istio.io/rewriteAppHTTPProbers: "false"`` turns rewriting off.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from diktyo.control.inject.capture import CapturePlan

ANNOTATION = "sidecar.istio.io/rewriteAppHTTPProbers"
ENV = "DIKTYO_KUBE_APP_PROBERS"
KINDS = (("readinessProbe", "readyz"), ("livenessProbe", "livez"), ("startupProbe", "startupz"))
_BOOL = {"1": True, "t": True, "true": True, "0": False, "f": False, "false": False}


def should_rewrite(annotations: dict[str, str], default: bool = True) -> bool:
    """The annotation decides if it parses as a Go bool (as Istio's strconv.ParseBool)."""
    value = annotations.get(ANNOTATION)
    if value is None:
        return default
    return _BOOL.get(value.strip().lower(), default)


def _captured(port: int, plan: CapturePlan) -> bool:
    include = plan.include_inbound_ports.strip()
    if include == "*":
        return port not in plan.exclude_inbound_ports
    return str(port) in {p.strip() for p in include.split(",")}


def _resolve(port: Any, container: dict[str, Any]) -> int | None:
    if isinstance(port, bool):
        return None
    if isinstance(port, int):
        return port if 0 < port < 65536 else None
    if isinstance(port, str):
        for p in container.get("ports") or []:
            if p.get("name") == port and isinstance(p.get("containerPort"), int):
                return int(p["containerPort"])
    return None


def rewrite_probes(containers: list[dict[str, Any]], plan: CapturePlan,
                   status_port: int) -> tuple[list[dict[str, Any]], str]:
    """(containers with rewritten probes, the ``DIKTYO_KUBE_APP_PROBERS`` JSON or "")."""
    probers: dict[str, dict[str, Any]] = {}
    out = []
    for c in containers:
        c = copy.deepcopy(c)
        name = str(c.get("name", ""))
        for field, suffix in KINDS:
            probe = c.get(field)
            if not isinstance(probe, dict):
                continue
            kind = next((k for k in ("httpGet", "tcpSocket", "grpc")
                         if isinstance(probe.get(k), dict)), None)
            if kind is None:
                continue  # exec: left alone (it runs inside the container, not over the network)
            action = probe[kind]
            port = _resolve(action.get("port"), c)
            if port is None or not _captured(port, plan):
                continue
            path = f"/app-health/{name}/{suffix}"
            timeout = probe.get("timeoutSeconds")
            entry: dict[str, Any] = {}
            if kind == "httpGet":
                original = {k: v for k, v in action.items() if k in ("path", "scheme", "host",
                                                                      "httpHeaders")}
                original["port"] = port
                entry["httpGet"] = original
            elif kind == "tcpSocket":
                entry["tcpSocket"] = {"port": port}
            else:
                entry["grpc"] = {"port": port}
                if isinstance(action.get("service"), str) and action["service"]:
                    entry["grpc"]["service"] = action["service"]
            if isinstance(timeout, int) and not isinstance(timeout, bool) and timeout > 0:
                entry["timeoutSeconds"] = timeout
            probers[path] = entry
            new = {k: v for k, v in probe.items() if k not in ("httpGet", "tcpSocket", "grpc")}
            http: dict[str, Any] = {"path": path, "port": status_port, "scheme": "HTTP"}
            if kind == "httpGet" and action.get("httpHeaders"):
                http["httpHeaders"] = action["httpHeaders"]  # the sidecar forwards them
            new["httpGet"] = http
            c[field] = new
        out.append(c)
    text = json.dumps(probers, sort_keys=True, separators=(",", ":")) if probers else ""
    return out, text
