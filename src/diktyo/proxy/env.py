"""The sidecar's environment: ``DIKTYO_*`` variables -> sidecar options, in one place.

A sidecar injected into a Kubernetes pod is configured by its container's environment (set by
the injector, ``diktyo.control.inject.pod``), as Istio's ``istio-proxy`` is by ``ISTIO_META_*``
and friends. ``sidecar_env(environ)`` reads every variable below, checks it and returns the
option values it sets; ``diktyo sidecar`` flags override them. A bad value is an
``EnvError`` naming the variable, the value and what is expected: the sidecar exits 2 before
it opens any port.

Variables (``ENV_VARS`` is the table ``--help`` and ``docs/kubernetes.md`` show):

==============================  ==============================================================
``DIKTYO_CONTROL_PLANE``        control plane URL (``http://diktyo.diktyo-system.svc:15010``)
``DIKTYO_NODE``                 node id; default ``$POD_NAME.$POD_NAMESPACE`` when both are set
``DIKTYO_ADMIN_PORT``           admin port (``/ready``, ``/config_dump``, ...), 0 = pick
``DIKTYO_ADMIN_ADDRESS``        admin address (default 127.0.0.1: the admin port stays private)
``DIKTYO_OUTBOUND_PORT``        outbound listener port
``DIKTYO_STATUS_PORT``          status port (Istio's 15020): ``/healthz/ready``,
                                ``/app-health/<container>/{readyz,livez,startupz}``,
                                ``/stats/prometheus``; unset = no status server
``DIKTYO_READINESS_PORT``       readiness port (Istio's 15021): ``/healthz/ready`` only
``DIKTYO_STATUS_ADDRESS``       address of both (default 0.0.0.0: the kubelet probes the pod IP)
``DIKTYO_LOG_LEVEL``            debug | info | warning | error (Istio's trace/warn/critical/off map)
``DIKTYO_DRAIN_TIMEOUT``        seconds in-flight requests get on SIGTERM
``DIKTYO_CONCURRENCY``          worker processes (Istio's ProxyConfig ``concurrency``; 0 = one
                                per core; default 1)
``DIKTYO_TOKEN_FILE``           bootstrap token file (``DIKTYO_CA_TOKEN_FILE`` is read too)
``DIKTYO_KUBE_TOKEN_FILE``      the pod's projected service-account token (audience diktyo-ca):
                                proves the sidecar to the control plane (TokenReview) when it
                                has no bootstrap token, for snapshots and for its workload
                                certificate (``spiffe://<trust domain>/ns/$POD_NAMESPACE/sa/
                                $SERVICE_ACCOUNT``)
``DIKTYO_TRUST_DOMAIN``         SPIFFE trust domain this pod expects; a snapshot for another is
                                logged as a warning
``DIKTYO_TRACING_SAMPLING``     percent of requests traced (0-100), the mesh-wide default the
                                snapshot's Telemetry resources still override per workload
``DIKTYO_KUBE_APP_PROBERS``     the app's original probes, Istio's ``ISTIO_KUBE_APP_PROBERS``
                                JSON (which is read too)
``INSTANCE_IP``                 the pod IP: where app probes are sent (as the kubelet does)
``DIKTYO_META_*``               node metadata (``WORKLOAD_NAME``, ``CANONICAL_REVISION``,
                                ``APP_CONTAINERS``, ``POD_PORTS`` JSON): checked, logged, and
                                ``APP_CONTAINERS`` must name every container a prober names
==============================  ==============================================================

``DIKTYO_INTERCEPTION_MODE`` (``REDIRECT`` in injected pods) is read by the capture listeners,
not here. Other ``DIKTYO_*`` variables of the sidecar (``DIKTYO_ADMIN_TOKEN_FILE``,
``DIKTYO_HTTP10``, ``DIKTYO_HOME``) keep their own readers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

LOG_LEVELS = {
    "trace": "debug", "debug": "debug", "info": "info", "warning": "warning", "warn": "warning",
    "error": "error", "critical": "error", "off": "error",
}  # fmt: skip
PROBE_PATH = re.compile(r"^/app-health/([^/]+)/(livez|readyz|startupz)$")
_DOMAIN = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*$")


class EnvError(ValueError):
    """A ``DIKTYO_*`` variable has a bad value; the message names it and says what is expected."""


def _port(name: str, raw: str, zero_ok: bool = True) -> int:
    text = raw.strip()
    if not (text.isascii() and text.isdigit()) or not (0 if zero_ok else 1) <= int(text) < 65536:
        raise EnvError(f"{name}={raw!r}: expected a TCP port number 1-65535"
                       + (" (0 = pick a free one)" if zero_ok else ""))
    return int(text)


def _address(name: str, raw: str) -> str:
    import ipaddress  # only when the environment sets an address (issue 11, idle RSS)

    try:
        return str(ipaddress.ip_address(raw.strip()))
    except ValueError:
        raise EnvError(f"{name}={raw!r}: expected an IP address, e.g. 0.0.0.0 or 127.0.0.1") from None


def _concurrency(name: str, raw: str) -> int:
    text = raw.strip()
    if not (text.isascii() and text.isdigit()) or int(text) > 64:
        raise EnvError(f"{name}={raw!r}: expected a number of worker processes 0-64 "
                       "(0 = one per core)")
    return int(text)


def _url(name: str, raw: str) -> str:
    text = raw.strip()
    if not re.match(r"^https?://[^/\s]+", text):
        raise EnvError(f"{name}={raw!r}: expected a URL like http://diktyo.diktyo-system.svc:15010")
    return text.rstrip("/")


def _seconds(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value < 86400:  # NaN fails the comparison too
        raise EnvError(f"{name}={raw!r}: expected seconds, a number from 0 (e.g. 10 or 2.5)")
    return value


def _percent(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 100:
        raise EnvError(f"{name}={raw!r}: expected a percentage from 0 to 100 (e.g. 1 or 0.5)")
    return value


def _log_level(name: str, raw: str) -> str:
    level = LOG_LEVELS.get(raw.strip().lower())
    if level is None:
        raise EnvError(f"{name}={raw!r}: expected one of debug, info, warning, error")
    return level


def _domain(name: str, raw: str) -> str:
    text = raw.strip().lower()
    if not text or len(text) > 253 or not _DOMAIN.match(text):
        raise EnvError(f"{name}={raw!r}: expected a DNS-like trust domain, e.g. cluster.local")
    return text


def _text(name: str, raw: str) -> str:
    if not raw.strip():
        raise EnvError(f"{name} is set but empty: unset it or give a value")
    return raw.strip()


def _int_port(where: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise EnvError(f"{where}: port must be a number 1-65535, got {value!r} (named ports are "
                       "resolved to numbers by the injector)")
    return value


def parse_app_probers(raw: str, name: str = "DIKTYO_KUBE_APP_PROBERS") -> dict[str, dict[str, Any]]:
    """Istio's ``ISTIO_KUBE_APP_PROBERS`` JSON: ``{"/app-health/<c>/<readyz|livez|startupz>":
    {"httpGet": {...}} | {"tcpSocket": {...}} | {"grpc": {...}}, "timeoutSeconds": N}``.

    Each entry has exactly one action with a numeric port; ``httpGet.scheme`` is HTTP or
    HTTPS. Returns the entries with ports as ints and ``timeoutSeconds`` defaulted to 1 (the
    kubelet's default)."""
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise EnvError(f"{name}: not JSON ({exc}); the injector writes "
                       '{"/app-health/<container>/readyz": {"httpGet": {"path": "/", "port": 8080}}}') from None
    if not isinstance(data, dict):
        raise EnvError(f"{name}: expected a JSON object of probe path -> prober")
    out: dict[str, dict[str, Any]] = {}
    for path, prober in data.items():
        where = f"{name}[{path!r}]"
        if not PROBE_PATH.match(path):
            raise EnvError(f"{where}: the path must be /app-health/<container>/readyz|livez|startupz")
        if not isinstance(prober, dict):
            raise EnvError(f"{where}: expected an object with httpGet, tcpSocket or grpc")
        actions = [k for k in ("httpGet", "tcpSocket", "grpc") if prober.get(k) is not None]
        if len(actions) != 1:
            raise EnvError(f"{where}: exactly one of httpGet, tcpSocket, grpc is needed, got "
                           f"{actions or 'none'}")
        kind = actions[0]
        action = prober[kind]
        if not isinstance(action, dict):
            raise EnvError(f"{where}.{kind}: expected an object")
        timeout = prober.get("timeoutSeconds", 1) or 1
        if isinstance(timeout, bool) or not isinstance(timeout, int) or timeout < 0:
            raise EnvError(f"{where}.timeoutSeconds: expected whole seconds, got {timeout!r}")
        clean: dict[str, Any] = {"timeoutSeconds": timeout}
        port = _int_port(f"{where}.{kind}.port", action.get("port"))
        if kind == "httpGet":
            scheme = str(action.get("scheme") or "HTTP").upper()
            if scheme not in ("HTTP", "HTTPS"):
                raise EnvError(f"{where}.httpGet.scheme: expected HTTP or HTTPS, got {scheme!r}")
            path_ = action.get("path") or "/"
            if not isinstance(path_, str) or any(c in path_ for c in "\r\n "):
                raise EnvError(f"{where}.httpGet.path: expected a URL path, got {path_!r}")
            clean[kind] = {"path": path_ if path_.startswith("/") else "/" + path_,
                           "port": port, "scheme": scheme}
        elif kind == "tcpSocket":
            clean[kind] = {"port": port}
        else:
            service = action.get("service")
            if service is not None and not isinstance(service, str):
                raise EnvError(f"{where}.grpc.service: expected a string")
            clean[kind] = {"port": port, "service": service or ""}
        out[path] = clean
    return out


@dataclass(frozen=True, slots=True)
class EnvVar:
    name: str
    option: str  # the SidecarOptions / argparse field it sets
    parse: Callable[[str, str], Any]
    help: str


ENV_VARS: tuple[EnvVar, ...] = (
    EnvVar("DIKTYO_CONTROL_PLANE", "control_plane", _url, "control plane URL"),
    EnvVar("DIKTYO_NODE", "node", _text, "node id (default $POD_NAME.$POD_NAMESPACE)"),
    EnvVar("DIKTYO_ADMIN_PORT", "admin_port", _port, "admin port"),
    EnvVar("DIKTYO_ADMIN_ADDRESS", "admin_address", _address, "admin address (default 127.0.0.1)"),
    EnvVar("DIKTYO_OUTBOUND_PORT", "outbound_port", _port, "outbound listener port"),
    EnvVar("DIKTYO_STATUS_PORT", "status_port", _port, "status port (Istio's 15020)"),
    EnvVar("DIKTYO_READINESS_PORT", "readiness_port", _port, "readiness port (Istio's 15021)"),
    EnvVar("DIKTYO_STATUS_ADDRESS", "status_address", _address, "status/readiness address"),
    EnvVar("DIKTYO_LOG_LEVEL", "log_level", _log_level, "log level"),
    EnvVar("DIKTYO_DRAIN_TIMEOUT", "drain_timeout", _seconds, "drain seconds"),
    EnvVar("DIKTYO_CONCURRENCY", "concurrency", _concurrency, "worker processes (0 = per core)"),
    EnvVar("DIKTYO_TOKEN_FILE", "token_file", _text, "bootstrap token file"),
    EnvVar("DIKTYO_KUBE_TOKEN_FILE", "kube_token_file", _text, "projected service-account token"),
    EnvVar("DIKTYO_TRUST_DOMAIN", "trust_domain", _domain, "expected trust domain"),
    EnvVar("DIKTYO_TRACING_SAMPLING", "tracing_sampling", _percent, "percent of requests traced"),
    EnvVar("INSTANCE_IP", "pod_ip", _address, "pod IP (app probes go there)"),
)


def sidecar_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """The option values the environment sets (only those set). Raises EnvError."""
    out: dict[str, Any] = {}
    for var in ENV_VARS:
        raw = environ.get(var.name)
        if raw is None or (raw == "" and var.name == "INSTANCE_IP"):
            continue  # status.podIP is "" until the pod has an IP
        out[var.option] = var.parse(var.name, raw)
    if "node" not in out and environ.get("POD_NAME") and environ.get("POD_NAMESPACE"):
        out["node"] = f"{environ['POD_NAME']}.{environ['POD_NAMESPACE']}"
    # the SPIFFE id asked for with the projected token (namespace + service account)
    for name, option in (("POD_NAMESPACE", "pod_namespace"), ("SERVICE_ACCOUNT", "service_account")):
        if environ.get(name, "").strip():
            out[option] = environ[name].strip()
    for name in ("DIKTYO_KUBE_APP_PROBERS", "ISTIO_KUBE_APP_PROBERS"):
        raw = environ.get(name)
        if raw:
            out["app_probers"] = parse_app_probers(raw, name)
            break
    meta = {k[len("DIKTYO_META_"):]: v for k, v in environ.items() if k.startswith("DIKTYO_META_")}
    if "POD_PORTS" in meta:
        try:
            ports = json.loads(meta["POD_PORTS"])
        except ValueError as exc:
            raise EnvError(f"DIKTYO_META_POD_PORTS: not JSON ({exc})") from None
        if not isinstance(ports, list) or not all(
            isinstance(p, dict) and isinstance(p.get("containerPort"), int) for p in ports
        ):
            raise EnvError('DIKTYO_META_POD_PORTS: expected a JSON list of {"containerPort": N, ...}')
    if meta:
        out["metadata"] = meta
    probers = out.get("app_probers") or {}
    if probers and "APP_CONTAINERS" in meta:
        containers = {c.strip() for c in meta["APP_CONTAINERS"].split(",") if c.strip()}
        for path in probers:
            m = PROBE_PATH.match(path)
            if m and m.group(1) not in containers:
                raise EnvError(f"DIKTYO_KUBE_APP_PROBERS: {path} names container {m.group(1)!r}, "
                               f"which DIKTYO_META_APP_CONTAINERS ({meta['APP_CONTAINERS']}) lacks")
    return out
