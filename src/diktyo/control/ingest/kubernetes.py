"""Kubernetes service registry: recorded API objects (Service, EndpointSlice, Pod) -> Registry.

Pure functions over the JSON/dict shape the API server returns (``kubectl get -o json``):
``registry_from_objects(objects, domain)`` builds a :class:`diktyo.control.model.Registry`
with Istio's conventions: FQDN ``<svc>.<ns>.svc.<domain>``, port protocol from
``appProtocol`` or the Istio port name (``http-*``, ``grpc-*``, ...), one
``WorkloadInstance`` per ready-or-not endpoint address with the backing pod's labels and
service account, ``conditions.ready`` -> ``healthy``.

``KubeWatcher`` is a thin list+watch client (resourceVersion, bookmarks, 410 -> relist)
over the Kubernetes API; tests run it against a server replaying recorded list/watch
responses on 127.0.0.1 (there is no cluster on the build machine).
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diktyo.api.loader import LoadResult, load_text
from diktyo.control.model import Registry, Service, ServicePort, WorkloadInstance

log = logging.getLogger(__name__)

# Istio protocol names (port name prefix / appProtocol) -> diktyo ServicePort.protocol
_PROTOCOLS = {
    "http": "HTTP", "http2": "HTTP2", "grpc": "GRPC", "grpc-web": "HTTP", "https": "HTTPS",
    "tls": "TLS", "tcp": "TCP", "mongo": "TCP", "mysql": "TCP", "redis": "TCP", "udp": "UDP",
    "kubernetes.io/h2c": "HTTP2", "kubernetes.io/ws": "HTTP", "kubernetes.io/wss": "HTTPS",
}


def port_protocol(name: str | None, app_protocol: str | None = None, transport: str = "TCP") -> str:
    """Istio's protocol selection: ``appProtocol`` wins, then the port name ``<proto>[-<suffix>]``.

    Unnamed or unknown ports are ``TCP`` (Istio would sniff the protocol; diktyo passes
    them through as TCP). UDP ports are ``UDP`` (not proxied).
    """
    if transport.upper() == "UDP":
        return "UDP"
    if app_protocol:
        got = _PROTOCOLS.get(app_protocol.lower())
        if got:
            return got
    if name:
        prefix = name.lower().split("-", 1)[0]
        return _PROTOCOLS.get(prefix, "TCP")
    return "TCP"


def service_fqdn(name: str, namespace: str, domain: str = "cluster.local") -> str:
    return f"{name}.{namespace}.svc.{domain}"


@dataclass(frozen=True, slots=True)
class _PodInfo:
    labels: dict[str, str]
    service_account: str
    has_sidecar: bool
    workload: str


def _pod_info(pod: dict[str, Any]) -> _PodInfo:
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    names = [c.get("name") for c in spec.get("containers") or []]
    names += [c.get("name") for c in spec.get("initContainers") or []]
    annotations = meta.get("annotations") or {}
    return _PodInfo(
        labels=dict(meta.get("labels") or {}),
        service_account=spec.get("serviceAccountName") or spec.get("serviceAccount") or "default",
        has_sidecar="diktyo-proxy" in names or "istio-proxy" in names
        or "sidecar.istio.io/status" in annotations,
        workload=workload_name(pod),
    )


def workload_name(pod: dict[str, Any]) -> str:
    """The owning workload's name: a ReplicaSet ``<deploy>-<hash>`` owner gives ``<deploy>``."""
    meta = pod.get("metadata") or {}
    for ref in meta.get("ownerReferences") or []:
        if ref.get("controller"):
            name = str(ref.get("name", ""))
            if ref.get("kind") == "ReplicaSet" and "-" in name:
                return name.rsplit("-", 1)[0]
            if ref.get("kind") == "Job" and "-" in name and name.rsplit("-", 1)[1].isdigit():
                return name.rsplit("-", 1)[0]  # CronJob-created job
            return name
    return str(meta.get("name") or (meta.get("generateName") or "").rstrip("-"))


def service_from_object(obj: dict[str, Any], domain: str = "cluster.local") -> Service | None:
    """A Kubernetes Service as a registry Service (TCP ports only; None without a name)."""
    meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
    name, ns = meta.get("name"), meta.get("namespace") or "default"
    if not name:
        return None
    ports = tuple(
        ServicePort(
            number=int(p["port"]),
            name=p.get("name") or "",
            protocol=port_protocol(p.get("name"), p.get("appProtocol"), p.get("protocol", "TCP")),
            target_port=p["targetPort"] if isinstance(p.get("targetPort"), int) else None,
        )
        for p in spec.get("ports") or []
        if str(p.get("protocol", "TCP")).upper() == "TCP"  # UDP/SCTP are not proxied (Istio)
    )
    external = spec.get("type") == "ExternalName"
    return Service(
        hostname=service_fqdn(name, ns, domain), namespace=ns, ports=ports, short_name=name,
        mesh_external=False,
        resolution="DNS" if external else ("NONE" if spec.get("clusterIP") == "None" else "STATIC"),
        source="kubernetes",
    )


def _kind(obj: dict[str, Any]) -> str:
    return str(obj.get("kind", ""))


def _flatten(objects: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for obj in objects:
        if _kind(obj).endswith("List") and isinstance(obj.get("items"), list):
            item_kind = _kind(obj)[: -len("List")]
            for item in obj["items"]:  # list items carry no kind/apiVersion
                out.append({"kind": item_kind, **item} if item_kind and "kind" not in item else item)
        else:
            out.append(obj)
    return out


def registry_from_objects(objects: Iterable[dict[str, Any]], domain: str = "cluster.local") -> Registry:
    """Services, EndpointSlices (discovery.k8s.io/v1) and Pods -> Registry.

    Accepts single objects and ``*List`` objects (``ServiceList``, ``EndpointSliceList``,
    ``PodList``, ``List``). Endpoint ports are matched to service ports by name, as the
    endpoints controller does. An address backing several services is one instance serving
    all of them.
    """
    objs = _flatten(objects)
    if any(_kind(o) == "List" for o in objs):
        objs = _flatten(objs)
    services: dict[tuple[str, str], tuple[Service, dict[str, Any]]] = {}
    pods: dict[tuple[str, str], dict[str, Any]] = {}
    pods_by_ip: dict[tuple[str, str], dict[str, Any]] = {}
    slices: list[dict[str, Any]] = []
    for obj in objs:
        kind = _kind(obj)
        meta = obj.get("metadata") or {}
        ns = meta.get("namespace") or "default"
        if kind == "Service":
            svc = service_from_object(obj, domain)
            if svc is not None:
                services[(ns, svc.short_name)] = (svc, obj)
        elif kind == "Pod":
            pods[(ns, meta.get("name", ""))] = obj
            for ip in [(obj.get("status") or {}).get("podIP")] + [
                    p.get("ip") for p in (obj.get("status") or {}).get("podIPs") or []]:
                if ip:
                    pods_by_ip[(ns, ip)] = obj
        elif kind == "EndpointSlice":
            slices.append(obj)

    merged: dict[tuple[str, str], dict[str, Any]] = {}  # (ns, address) -> instance fields
    for sl in slices:
        meta = sl.get("metadata") or {}
        ns = meta.get("namespace") or "default"
        svc_name = (meta.get("labels") or {}).get("kubernetes.io/service-name")
        if not svc_name or (ns, svc_name) not in services:
            continue
        if sl.get("addressType", "IPv4") not in ("IPv4", "IPv6"):
            continue
        svc, _ = services[(ns, svc_name)]
        by_name = {p.name: p.number for p in svc.ports}
        port_map: dict[int, int] = {}
        for ep_port in sl.get("ports") or []:
            svc_port = by_name.get(ep_port.get("name") or "")
            if svc_port is None and len(svc.ports) == 1:
                svc_port = svc.ports[0].number
            if svc_port is not None and ep_port.get("port") is not None:
                port_map[svc_port] = int(ep_port["port"])
        for ep in sl.get("endpoints") or []:
            conditions = ep.get("conditions") or {}
            ready = conditions.get("ready")
            healthy = (ready is None or bool(ready)) and not conditions.get("terminating", False)
            target = ep.get("targetRef") or {}
            pod = None
            if target.get("kind") == "Pod":
                pod = pods.get((target.get("namespace") or ns, target.get("name", "")))
            for address in ep.get("addresses") or []:
                if pod is None:
                    pod = pods_by_ip.get((ns, address))
                info = _pod_info(pod) if pod is not None else None
                key = (ns, address)
                entry = merged.get(key)
                if entry is None:
                    entry = merged[key] = {
                        "name": target.get("name") or address,
                        "workload": info.workload if info else (target.get("name") or svc_name),
                        "address": address, "ports": {}, "services": [], "namespace": ns,
                        "labels": info.labels if info else {},
                        "service_account": info.service_account if info else "default",
                        "has_sidecar": info.has_sidecar if info else False,
                        "healthy": healthy,
                    }
                entry["ports"].update(port_map)
                if svc.hostname not in entry["services"]:
                    entry["services"].append(svc.hostname)
                entry["healthy"] = entry["healthy"] and healthy
    instances = tuple(
        WorkloadInstance(**{**e, "services": tuple(e["services"])})
        for _, e in sorted(merged.items())
    )
    return Registry(
        services=tuple(s for _, (s, _) in sorted(services.items())), instances=instances)


# --------------------------------------------------------------------------- Istio config (CRDs)

#: Istio config kinds served as CRDs: kind -> (group, plural)
CONFIG_KINDS: dict[str, tuple[str, str]] = {
    "VirtualService": ("networking.istio.io", "virtualservices"),
    "DestinationRule": ("networking.istio.io", "destinationrules"),
    "ServiceEntry": ("networking.istio.io", "serviceentries"),
    "Gateway": ("networking.istio.io", "gateways"),
    "Sidecar": ("networking.istio.io", "sidecars"),
    "PeerAuthentication": ("security.istio.io", "peerauthentications"),
    "AuthorizationPolicy": ("security.istio.io", "authorizationpolicies"),
    "RequestAuthentication": ("security.istio.io", "requestauthentications"),
}
_SERVER_FIELDS = ("managedFields", "uid", "resourceVersion", "generation", "creationTimestamp",
                  "selfLink", "ownerReferences", "finalizers")


def config_from_objects(objects: Iterable[dict[str, Any]]) -> LoadResult:
    """Istio custom resources as returned by the API server -> validated diktyo.api resources.

    Non-Istio objects are ignored; server-populated metadata (managedFields, uid, ...,
    ``last-applied-configuration``) and ``status`` are dropped. Errors name the object as
    ``kubernetes:<Kind>/<namespace>/<name>``.
    """
    result = LoadResult()
    for obj in _flatten(objects):
        kind = _kind(obj)
        group = str(obj.get("apiVersion", "")).rpartition("/")[0]
        if kind not in CONFIG_KINDS or group != CONFIG_KINDS[kind][0]:
            continue
        meta = {k: v for k, v in (obj.get("metadata") or {}).items() if k not in _SERVER_FIELDS}
        annotations = {k: v for k, v in (meta.get("annotations") or {}).items()
                       if k != "kubectl.kubernetes.io/last-applied-configuration"}
        if annotations:
            meta["annotations"] = annotations
        else:
            meta.pop("annotations", None)
        meta.setdefault("namespace", "default")
        clean = {"apiVersion": obj["apiVersion"], "kind": kind, "metadata": meta, "spec": obj.get("spec") or {}}
        name = f"kubernetes:{kind}/{meta['namespace']}/{meta.get('name', '?')}"
        result.extend(load_text(json.dumps(clean, indent=1), name))
    return result


# --------------------------------------------------------------------------- watch client (I/O)

@dataclass(slots=True)
class KubeWatcher:
    """List+watch Services, EndpointSlices and Pods from the API server; rebuild the Registry.

    Runs inside a pod with the service account token (``in_cluster()``). Keeps the latest
    object per (kind, namespace, name), follows ``resourceVersion`` (with bookmarks),
    relists on 410 Gone, retries after connection errors (warning + ``errors`` counter),
    and calls ``on_registry`` with a fresh Registry after each change once every kind has
    been listed (no half-synced registry is ever published). Tested against a recorded
    list/watch replay server, not against a real cluster.
    """

    base_url: str
    token: str
    ca_file: str | None = None
    domain: str = "cluster.local"
    on_registry: Callable[[Registry], Awaitable[None]] | None = None
    on_config: Callable[[LoadResult], Awaitable[None]] | None = None
    retry_delay: float = 1.0
    watch_timeout: int = 300  # seconds the API server keeps one watch open
    objects: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)
    synced: set[str] = field(default_factory=set)
    errors: int = 0
    relists: int = 0
    published: bool = False

    RESOURCES = (("Service", "/api/v1/services"),
                 ("EndpointSlice", "/apis/discovery.k8s.io/v1/endpointslices"),
                 ("Pod", "/api/v1/pods"))
    CONFIG_RESOURCES = tuple((kind, f"/apis/{group}/v1/{plural}")
                             for kind, (group, plural) in CONFIG_KINDS.items())

    @classmethod
    def in_cluster(cls, **kw: Any) -> KubeWatcher:
        import os
        sa = Path("/var/run/secrets/kubernetes.io/serviceaccount")
        host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"]
        return cls(base_url=f"https://{host}:{port}", token=(sa / "token").read_text().strip(),
                   ca_file=str(sa / "ca.crt"), **kw)

    def registry(self) -> Registry:
        return registry_from_objects(
            (o for k, o in self.objects.items() if k[0] not in CONFIG_KINDS), self.domain)

    def config(self) -> LoadResult:
        return config_from_objects(o for k, o in self.objects.items() if k[0] in CONFIG_KINDS)

    def _resources(self) -> tuple[tuple[str, str], ...]:
        return self.RESOURCES + (self.CONFIG_RESOURCES if self.on_config is not None else ())

    async def run(self) -> None:
        """Watch until cancelled."""
        import aiohttp

        ctx = ssl.create_default_context(cafile=self.ca_file) if self.ca_file else None
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        async with aiohttp.ClientSession(headers=headers) as session, asyncio.TaskGroup() as tg:
            for kind, path in self._resources():
                tg.create_task(self._watch(session, ctx, kind, path))

    async def _watch(self, session: Any, ctx: ssl.SSLContext | None, kind: str, path: str) -> None:
        import aiohttp

        while True:
            try:
                rv: str | None = await self._list(session, ctx, kind, path)
                while rv is not None:
                    rv = await self._watch_once(session, ctx, kind, path, rv)
                self.relists += 1
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError, KeyError) as exc:
                self.errors += 1
                log.warning("kubernetes %s watch failed (%s: %s); retrying in %.1fs",
                            kind, type(exc).__name__, exc, self.retry_delay)
                await asyncio.sleep(self.retry_delay)

    async def _list(self, session: Any, ctx: ssl.SSLContext | None, kind: str, path: str) -> str:
        async with session.get(self.base_url + path, ssl=ctx) as resp:
            resp.raise_for_status()
            body = await resp.json()
        for key in [k for k in self.objects if k[0] == kind]:
            del self.objects[key]
        for item in body.get("items") or []:
            self._store(kind, "ADDED", item)
        self.synced.add(kind)
        await self._changed(kind)
        return str(body["metadata"]["resourceVersion"])

    async def _watch_once(self, session: Any, ctx: ssl.SSLContext | None, kind: str, path: str,
                          rv: str) -> str | None:
        """One watch request; the resourceVersion to continue from, or None to relist."""
        import aiohttp

        url = (f"{self.base_url}{path}?watch=1&resourceVersion={rv}"
               f"&allowWatchBookmarks=true&timeoutSeconds={self.watch_timeout}")
        timeout = aiohttp.ClientTimeout(total=None, sock_read=self.watch_timeout + 30)
        async with session.get(url, ssl=ctx, timeout=timeout) as resp:
            if resp.status == 410:
                return None
            resp.raise_for_status()
            async for line in resp.content:
                if not line.strip():
                    continue
                event = json.loads(line)
                obj = event.get("object") or {}
                if event.get("type") == "ERROR":  # a Status object
                    if obj.get("code") == 410:
                        return None
                    raise ValueError(f"watch error: {obj.get('message', obj)}")
                rv = str((obj.get("metadata") or {}).get("resourceVersion", rv))
                if event.get("type") == "BOOKMARK":
                    continue
                self._store(kind, str(event["type"]), obj)
                await self._changed(kind)
        return rv

    def _store(self, kind: str, event: str, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        key = (kind, meta.get("namespace", ""), meta.get("name", ""))
        if event == "DELETED":
            self.objects.pop(key, None)
        else:
            self.objects[key] = {"kind": kind, **obj}

    async def _changed(self, kind: str) -> None:
        if len(self.synced) < len(self._resources()):
            return  # publish nothing half-synced
        first, self.published = not self.published, True
        if (first or kind in CONFIG_KINDS) and self.on_config is not None:
            await self.on_config(self.config())
        if (first or kind not in CONFIG_KINDS) and self.on_registry is not None:
            await self.on_registry(self.registry())
