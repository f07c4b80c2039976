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
import os
import ssl
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from diktyo.api.loader import LoadResult, load_text
from diktyo.control.model import (
    InboundPort,
    ProxyNode,
    Registry,
    Service,
    ServicePort,
    WorkloadInstance,
)
from diktyo.snapshot.model import Node

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
        addresses=() if external else cluster_ips(spec),
    )


def cluster_ips(spec: dict[str, Any]) -> tuple[str, ...]:
    """The Service's virtual IPs: ``clusterIPs`` (dual stack, primary first) or ``clusterIP``;
    none for a headless Service (``"None"``) or one not allocated yet (``""``)."""
    ips = [str(ip) for ip in spec.get("clusterIPs") or ()]
    if spec.get("clusterIP"):
        ips.insert(0, str(spec["clusterIP"]))
    return tuple(dict.fromkeys(ip for ip in ips if ip and ip != "None"))


INTERCEPTION_ANNOTATION = "sidecar.istio.io/interceptionMode"
CAPTURE_INIT_CONTAINERS = ("diktyo-init", "istio-init")  # install the iptables REDIRECT rules
_warned_modes: set[tuple[str, str, str]] = set()


def interception_mode(pod: dict[str, Any]) -> Literal["REDIRECT", "NONE"]:
    """The sidecar's interception mode, as Istio's injector decides it: the pod's
    ``sidecar.istio.io/interceptionMode`` annotation, REDIRECT by default, but only when the
    pod carries the capture init container (``diktyo-init``/``istio-init``): without it nothing
    sends traffic to 15001/15006. ``NONE`` (capture disabled) -> NONE; ``TPROXY`` is not
    supported by diktyo's sidecar (it reads ``SO_ORIGINAL_DST``): NONE, with a warning."""
    meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
    inits = {str(c.get("name")) for c in spec.get("initContainers") or ()}
    if not inits & set(CAPTURE_INIT_CONTAINERS):
        return "NONE"
    mode = str((meta.get("annotations") or {}).get(INTERCEPTION_ANNOTATION, "REDIRECT"))
    mode = mode.strip().upper() or "REDIRECT"
    if mode in ("REDIRECT", "NONE"):
        return "REDIRECT" if mode == "REDIRECT" else "NONE"
    key = (str(meta.get("namespace", "")), str(meta.get("name", "")), mode)
    if key not in _warned_modes:
        _warned_modes.add(key)
        log.warning("pod %s/%s: %s=%s is not supported (diktyo's sidecar captures with REDIRECT "
                    "only); its sidecar gets no capture listeners", key[0], key[1],
                    INTERCEPTION_ANNOTATION, mode)
    return "NONE"


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


# --------------------------------------------------------------------------- resources watched

@dataclass(frozen=True, slots=True)
class Resource:
    """One API resource the watcher lists and watches, identified by group/version/kind.

    Objects are kept per (group, version, kind, namespace, name): the Gateway API's
    ``Gateway`` (gateway.networking.k8s.io) and Istio's (networking.istio.io) never collide."""

    group: str  # "" = the core group
    version: str
    kind: str
    plural: str
    config: bool = False  # Istio / Gateway API config (a CRD that may not be installed)

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def path(self) -> str:
        if not self.group:
            return f"/api/{self.version}/{self.plural}"
        return f"/apis/{self.group}/{self.version}/{self.plural}"

    def __str__(self) -> str:
        return f"{self.kind}.{self.group or 'core'}/{self.version}"


CORE_RESOURCES: tuple[Resource, ...] = (
    Resource("", "v1", "Service", "services"),
    Resource("discovery.k8s.io", "v1", "EndpointSlice", "endpointslices"),
    Resource("", "v1", "Pod", "pods"),
)
#: Istio and Gateway API custom resources diktyo serves (the version each is watched at)
CONFIG_RESOURCES: tuple[Resource, ...] = tuple(
    Resource(g, v, k, p, config=True) for g, v, k, p in (
        ("networking.istio.io", "v1", "VirtualService", "virtualservices"),
        ("networking.istio.io", "v1", "DestinationRule", "destinationrules"),
        ("networking.istio.io", "v1", "ServiceEntry", "serviceentries"),
        ("networking.istio.io", "v1", "Gateway", "gateways"),
        ("networking.istio.io", "v1", "Sidecar", "sidecars"),
        ("security.istio.io", "v1", "PeerAuthentication", "peerauthentications"),
        ("security.istio.io", "v1", "AuthorizationPolicy", "authorizationpolicies"),
        ("security.istio.io", "v1", "RequestAuthentication", "requestauthentications"),
        ("telemetry.istio.io", "v1", "Telemetry", "telemetries"),
        ("gateway.networking.k8s.io", "v1", "Gateway", "gateways"),
        ("gateway.networking.k8s.io", "v1", "HTTPRoute", "httproutes"),
        ("gateway.networking.k8s.io", "v1", "GRPCRoute", "grpcroutes"),
        ("gateway.networking.k8s.io", "v1beta1", "ReferenceGrant", "referencegrants"),
    )
)  # fmt: skip
_CONFIG_GROUP_KINDS = {(r.group, r.kind) for r in CONFIG_RESOURCES}
_SERVER_FIELDS = ("managedFields", "uid", "resourceVersion", "generation", "creationTimestamp",
                  "selfLink", "ownerReferences", "finalizers")


def config_from_objects(objects: Iterable[dict[str, Any]]) -> LoadResult:
    """Istio and Gateway API custom resources as returned by the API server -> validated
    diktyo.api resources.

    Other objects are ignored (by group *and* kind: a Gateway API ``Gateway`` is not Istio's);
    server-populated metadata (managedFields, uid, ..., ``last-applied-configuration``) and
    ``status`` are dropped. Errors name the object as ``kubernetes:<Kind>/<namespace>/<name>``.
    """
    result = LoadResult()
    for obj in _flatten(objects):
        kind = _kind(obj)
        group = str(obj.get("apiVersion", "")).rpartition("/")[0]
        if (group, kind) not in _CONFIG_GROUP_KINDS:
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
        shown = kind if group != "gateway.networking.k8s.io" else f"{kind}.{group}"
        name = f"kubernetes:{shown}/{meta['namespace']}/{meta.get('name', '?')}"
        result.extend(load_text(json.dumps(clean, indent=1), name))
    return result


# --------------------------------------------------------------------------- sidecars (pods)

def proxies_from_objects(objects: Iterable[dict[str, Any]], domain: str = "cluster.local",
                         trust_domain: str = "cluster.local") -> list[ProxyNode]:
    """A ``ProxyNode`` for every running pod with an injected sidecar, under the node id the
    sidecar uses (``$POD_NAME.$POD_NAMESPACE``): its labels, service account, workload, the
    services whose endpoints it backs, and inbound ports (service port -> the app's port)."""
    objs = _flatten(objects)
    registry = registry_from_objects(objs, domain)
    by_address: dict[tuple[str, str], list[WorkloadInstance]] = {}
    for inst in registry.instances:
        by_address.setdefault((inst.namespace, inst.address), []).append(inst)
    out = []
    for pod in objs:
        if _kind(pod) != "Pod":
            continue
        meta, status = pod.get("metadata") or {}, pod.get("status") or {}
        info = _pod_info(pod)
        ip = status.get("podIP")
        if not info.has_sidecar or not ip or status.get("phase") in ("Succeeded", "Failed"):
            continue
        ns = meta.get("namespace") or "default"
        insts = by_address.get((ns, ip), [])
        services = tuple(dict.fromkeys(s for i in insts for s in i.services))
        ports = {sp: tp for i in insts for sp, tp in i.ports.items()}
        node = Node(id=f"{meta.get('name', '')}.{ns}", workload=info.workload, namespace=ns,
                    labels=info.labels, service_account=info.service_account,
                    trust_domain=trust_domain, services=services,
                    interception_mode=interception_mode(pod))
        inbound = tuple(InboundPort(service_port=sp, listen_port=0, app_port=tp)
                        for sp, tp in sorted(ports.items()))
        # listeners bind every address of the pod's network namespace, as Istio's 15001/15006
        # do (other sidecars reach this one at its pod IP, from the registry); no HTTP-proxy
        # listener (outbound_port 0): the app's traffic is captured into virtualOutbound 15001
        out.append(ProxyNode(node=node, address="0.0.0.0", outbound_port=0, inbound=inbound))
    return sorted(out, key=lambda p: p.node.id)


# --------------------------------------------------------------------------- watch client (I/O)

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


@dataclass(frozen=True, slots=True)
class InCluster:
    """Where the API server is and how to prove who we are, from inside a pod."""

    base_url: str
    token_file: str
    ca_file: str
    namespace: str


def in_cluster(environ: Mapping[str, str] | None = None, sa_dir: str | None = None) -> InCluster | None:
    """The in-cluster API config, or None when not in a pod: ``KUBERNETES_SERVICE_HOST`` /
    ``_PORT`` (set by the kubelet in every container) and the service account's token and CA
    in ``/var/run/secrets/kubernetes.io/serviceaccount`` (``$DIKTYO_KUBE_SA_DIR`` elsewhere)."""
    env = os.environ if environ is None else environ
    host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
    sa = Path(sa_dir or env.get("DIKTYO_KUBE_SA_DIR") or SA_DIR)
    if not host or not port or not (sa / "token").is_file():
        return None
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 service IP
    ns_file = sa / "namespace"
    namespace = ns_file.read_text().strip() if ns_file.is_file() else env.get("POD_NAMESPACE", "")
    return InCluster(f"https://{host}:{port}", str(sa / "token"), str(sa / "ca.crt"), namespace)


@dataclass(slots=True)
class KubeWatcher:
    """List+watch Services, EndpointSlices and Pods (and, with ``on_config``, Istio and Gateway
    API custom resources) from the API server; publish a Registry, config and sidecar nodes.

    Keeps the latest object per (group, version, kind, namespace, name), follows
    ``resourceVersion`` (with bookmarks), relists on 410 Gone, retries after connection errors
    (warning + ``errors`` counter). The registry (and ``on_proxies``) is published after each
    change once Services, EndpointSlices and Pods have all been listed (never half-synced).
    Config is published once every custom resource is listed *or known to be missing*: a CRD
    that is not installed (404) or not readable (403) is polled every ``crd_poll`` seconds and
    picked up when it appears, without holding up the rest. Tested against a small API server
    on 127.0.0.1 replaying recorded objects, not against a real cluster.
    """

    base_url: str
    token: str = ""
    ca_file: str | None = None
    token_file: str | None = None  # re-read before each request (the kubelet rotates it)
    domain: str = "cluster.local"
    trust_domain: str = "cluster.local"
    on_registry: Callable[[Registry], Awaitable[None]] | None = None
    on_config: Callable[[LoadResult], Awaitable[None]] | None = None
    on_proxies: Callable[[list[ProxyNode]], Awaitable[None]] | None = None
    retry_delay: float = 1.0
    crd_poll: float = 30.0  # seconds between looks for a custom resource that is not there
    watch_timeout: int = 300  # seconds the API server keeps one watch open
    objects: dict[tuple[Resource, str, str], dict[str, Any]] = field(default_factory=dict)
    synced: set[Resource] = field(default_factory=set)
    absent: set[Resource] = field(default_factory=set)
    errors: int = 0
    relists: int = 0
    published: bool = False
    config_published: bool = False

    @classmethod
    def in_cluster(cls, config: InCluster | None = None, **kw: Any) -> KubeWatcher:
        cfg = config or in_cluster()
        if cfg is None:
            raise RuntimeError("not in a Kubernetes pod: KUBERNETES_SERVICE_HOST or the "
                               f"service account token in {SA_DIR} is missing")
        return cls(base_url=cfg.base_url, token_file=cfg.token_file,
                   ca_file=cfg.ca_file if Path(cfg.ca_file).is_file() else None, **kw)

    def _items(self, config: bool) -> Iterable[dict[str, Any]]:
        return (o for (res, _, _), o in self.objects.items() if res.config == config)

    def registry(self) -> Registry:
        return registry_from_objects(self._items(False), self.domain)

    def proxies(self) -> list[ProxyNode]:
        return proxies_from_objects(self._items(False), self.domain, self.trust_domain)

    def config(self) -> LoadResult:
        return config_from_objects(self._items(True))

    def resources(self) -> tuple[Resource, ...]:
        return CORE_RESOURCES + (CONFIG_RESOURCES if self.on_config is not None else ())

    def _headers(self) -> dict[str, str]:
        token = self.token
        if self.token_file:
            token = Path(self.token_file).read_text().strip()
        return {"Authorization": f"Bearer {token}", "Accept": "application/json"}

    async def run(self) -> None:
        """Watch until cancelled."""
        import aiohttp

        ctx = ssl.create_default_context(cafile=self.ca_file) if self.ca_file else None
        async with aiohttp.ClientSession() as session, asyncio.TaskGroup() as tg:
            for res in self.resources():
                tg.create_task(self._watch(session, ctx, res))

    async def _watch(self, session: Any, ctx: ssl.SSLContext | None, res: Resource) -> None:
        import aiohttp

        while True:
            try:
                rv: str | None = await self._list(session, ctx, res)
                if rv is None:  # the resource is not served (CRD missing) or not allowed
                    await asyncio.sleep(self.crd_poll)
                    continue
                while rv is not None:
                    rv = await self._watch_once(session, ctx, res, rv)
                self.relists += 1
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError, KeyError) as exc:
                self.errors += 1
                log.warning("kubernetes %s watch failed (%s: %s); retrying in %.1fs",
                            res, type(exc).__name__, exc, self.retry_delay)
                await asyncio.sleep(self.retry_delay)

    async def _list(self, session: Any, ctx: ssl.SSLContext | None, res: Resource) -> str | None:
        """List ``res``; its resourceVersion, or None for a custom resource the API server does
        not serve (404: CRD not installed) or lets us not read (403: RBAC)."""
        async with session.get(self.base_url + res.path, ssl=ctx, headers=self._headers()) as resp:
            if res.config and resp.status in (403, 404):
                if res not in self.absent:
                    why = ("its CRD is not installed" if resp.status == 404 else
                           "the service account may not list it (add it to the ClusterRole)")
                    log.warning("kubernetes %s: %d, %s; serving without it, looking again every "
                                "%gs", res, resp.status, why, self.crd_poll)
                had = self._drop(res)
                self.absent.add(res)
                self.synced.discard(res)
                if had or not self.config_published:
                    await self._changed(res)
                return None
            resp.raise_for_status()
            body = await resp.json()
        if res in self.absent:
            log.info("kubernetes %s: now served, watching it", res)
            self.absent.discard(res)
        self._drop(res)
        for item in body.get("items") or []:
            self._store(res, "ADDED", item)
        self.synced.add(res)
        await self._changed(res)
        return str(body["metadata"]["resourceVersion"])

    def _drop(self, res: Resource) -> bool:
        keys = [k for k in self.objects if k[0] == res]
        for key in keys:
            del self.objects[key]
        return bool(keys)

    async def _watch_once(self, session: Any, ctx: ssl.SSLContext | None, res: Resource,
                          rv: str) -> str | None:
        """One watch request; the resourceVersion to continue from, or None to relist."""
        import aiohttp

        url = (f"{self.base_url}{res.path}?watch=1&resourceVersion={rv}"
               f"&allowWatchBookmarks=true&timeoutSeconds={self.watch_timeout}")
        timeout = aiohttp.ClientTimeout(total=None, sock_read=self.watch_timeout + 30)
        async with session.get(url, ssl=ctx, timeout=timeout, headers=self._headers()) as resp:
            if resp.status in (404, 410):
                return None  # 410: too old; 404: the CRD went away -> relist finds out
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
                self._store(res, str(event["type"]), obj)
                await self._changed(res)
        return rv

    def _store(self, res: Resource, event: str, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        key = (res, meta.get("namespace", ""), meta.get("name", ""))
        if event == "DELETED":
            self.objects.pop(key, None)
        else:
            self.objects[key] = {"kind": res.kind, "apiVersion": res.api_version, **obj}

    async def _changed(self, res: Resource) -> None:
        if res.config:
            if self.on_config is None:
                return
            if all(r in self.synced or r in self.absent for r in CONFIG_RESOURCES):
                self.config_published = True
                await self.on_config(self.config())
            return
        if not all(r in self.synced for r in CORE_RESOURCES):
            return  # publish no half-synced registry
        self.published = True
        if self.on_registry is not None:
            await self.on_registry(self.registry())
        if self.on_proxies is not None:
            await self.on_proxies(self.proxies())


# --------------------------------------------------------------------------- sidecar tokens

TOKEN_AUDIENCE = "diktyo-ca"  # the injected pods' projected token (volume diktyo-token)
_SA_USER = "system:serviceaccount:"
MAX_TOKEN_BYTES = 8192  # a projected service-account token is about 1 KB
_CLOCK_SKEW = 60.0  # seconds an "exp" may lie in the past before the pre-check refuses


def _b64url_json(part: str) -> Any:
    import base64

    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def token_shape_problem(token: str, now: float) -> str | None:
    """Why ``token`` cannot be a pod's projected service-account token for diktyo, or None.

    Checked before a TokenReview, so garbage costs the API server nothing: the size, the JWT
    form (three base64url parts, a JSON header naming a signing algorithm, a JSON payload),
    the audience ``diktyo-ca``, a service account as subject, and ``exp`` not in the past
    (``now``: seconds since the epoch). This verifies nothing: a well-formed forgery still
    goes to the API server, which checks the signature (and the source's refusal budget,
    ``control.auth.ReviewLimiter``, bounds how often that can happen)."""
    if len(token) > MAX_TOKEN_BYTES:
        return f"longer than {MAX_TOKEN_BYTES} bytes"
    parts = token.split(".")
    if len(parts) != 3 or not all(parts):
        return "not a JWT (header.payload.signature)"
    try:
        header, payload = _b64url_json(parts[0]), _b64url_json(parts[1])
    except (ValueError, UnicodeDecodeError):
        return "a JWT whose header or payload is not base64url-encoded JSON"
    if not isinstance(header, dict) or not isinstance(payload, dict):
        return "a JWT whose header or payload is not a JSON object"
    alg = header.get("alg")
    if not isinstance(alg, str) or not alg or alg.lower() == "none":
        return "an unsigned JWT"
    aud = payload.get("aud")
    audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
    if TOKEN_AUDIENCE not in audiences:
        return f"not for audience {TOKEN_AUDIENCE}"
    sub = payload.get("sub")
    if not isinstance(sub, str) or not sub.startswith(_SA_USER) or sub.count(":") != 3:
        return "not a service account's token"
    exp = payload.get("exp")
    if isinstance(exp, int | float) and exp + _CLOCK_SKEW < now:
        return "expired"
    return None


class TokenReviewer:
    """Proves a sidecar's identity from its projected service-account token, as istiod does:
    ``POST /apis/authentication.k8s.io/v1/tokenreviews`` with audience ``diktyo-ca``.

    ``await reviewer(token)`` -> ``(namespace, service_account)`` or None (not authenticated,
    not a service account, wrong audience, API unreachable: all logged). Answers are cached
    per token for ``ttl`` seconds (refusals for ``negative_ttl``) so long polls do not cost a
    review each. A token that cannot be a projected token (``token_shape_problem``) is refused
    without a review (``prechecked`` counts them)."""

    def __init__(self, base_url: str, token_file: str | None = None, token: str = "",
                 ca_file: str | None = None, ttl: float = 60.0, negative_ttl: float = 5.0,
                 clock: Callable[[], float] | None = None,
                 wall: Callable[[], float] | None = None) -> None:
        import time

        self.base_url = base_url
        self.token_file = token_file
        self.token = token
        self.ctx = ssl.create_default_context(cafile=ca_file) if ca_file else None
        self.ttl, self.negative_ttl = ttl, negative_ttl
        self.clock = clock or time.monotonic
        self.wall = wall or time.time  # for the tokens' "exp"
        self.cache: dict[str, tuple[float, tuple[str, str] | None]] = {}
        self.reviews = 0
        self.prechecked = 0  # tokens refused without a review
        self._session: Any = None

    def _auth(self) -> str:
        token = Path(self.token_file).read_text().strip() if self.token_file else self.token
        return f"Bearer {token}"

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __call__(self, token: str) -> tuple[str, str] | None:
        import hashlib

        import aiohttp

        key = hashlib.sha256(token.encode()).hexdigest()
        now = self.clock()
        hit = self.cache.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        problem = token_shape_problem(token, self.wall())
        if problem is not None:
            self.prechecked += 1
            log.debug("sidecar token refused without a TokenReview: %s", problem)
            return None
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                "spec": {"token": token, "audiences": [TOKEN_AUDIENCE]}}
        self.reviews += 1
        try:
            async with self._session.post(
                    self.base_url + "/apis/authentication.k8s.io/v1/tokenreviews", json=body,
                    ssl=self.ctx, headers={"Authorization": self._auth()}) as resp:
                if resp.status != 201 and resp.status != 200:
                    log.warning("TokenReview answered %d (does the ClusterRole allow creating "
                                "tokenreviews?); sidecar refused", resp.status)
                    return None  # not cached: the API server may be back on the next poll
                answer = await resp.json()
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            log.warning("TokenReview failed (%s: %s); sidecar refused", type(exc).__name__, exc)
            return None
        result = self._identity(answer.get("status") or {})
        self.cache[key] = (now + (self.ttl if result else self.negative_ttl), result)
        if len(self.cache) > 10000:  # tokens of pods long gone
            self.cache = {k: v for k, v in self.cache.items() if v[0] > now}
        return result

    @staticmethod
    def _identity(status: dict[str, Any]) -> tuple[str, str] | None:
        user = str((status.get("user") or {}).get("username", ""))
        audiences = status.get("audiences")
        if not status.get("authenticated"):
            log.info("sidecar token not authenticated: %s", status.get("error", "no reason given"))
            return None
        if audiences is not None and TOKEN_AUDIENCE not in audiences:
            log.warning("sidecar token for %s is not for audience %s", user, TOKEN_AUDIENCE)
            return None
        if not user.startswith(_SA_USER) or user.count(":") != 3:
            log.warning("token of %r is not a service account's: refused", user)
            return None
        namespace, sa = user[len(_SA_USER):].split(":")
        return namespace, sa


# --------------------------------------------------------------------------- control plane

class ProxySync:
    """Keeps the control plane's proxies equal to the watched pods with sidecars (only those
    this source added: proxies registered through the HTTP API are left alone)."""

    def __init__(self, cp: Any) -> None:
        self.cp = cp
        self.known: dict[str, ProxyNode] = {}

    async def __call__(self, proxies: list[ProxyNode]) -> None:
        want = {p.node.id: p for p in proxies}
        for node_id in [n for n in self.known if n not in want]:
            self.cp.remove_proxy(node_id)
            del self.known[node_id]
            log.info("kubernetes: sidecar %s is gone", node_id)
        for node_id, proxy in want.items():
            if self.known.get(node_id) != proxy:
                self.cp.add_proxy(proxy)
                if node_id not in self.known:
                    log.info("kubernetes: sidecar %s (%s, %d services)", node_id,
                             proxy.node.service_account, len(proxy.node.services))
                self.known[node_id] = proxy


def use_token_review(cp: Any, reviewer: TokenReviewer) -> None:
    """Sidecars of ``cp`` (a ControlPlane) prove themselves with their projected
    service-account token, checked by ``reviewer``: for snapshots/ACKs and for their workload
    certificate (``POST /v1/certificates``), both under the SPIFFE id of its namespace and
    service account in the control plane's trust domain."""

    async def review(token: str) -> str | None:
        who = await reviewer(token)
        return cp.identity.spiffe_id(*who) if who else None

    cp.access.token_reviewer = review
    cp.identity.service.token_reviewer = review


def watch_in_cluster(
    cp: Any, config: InCluster | None = None
) -> tuple[KubeWatcher, asyncio.Task[None]] | None:
    """When running in a pod, start a ``KubeWatcher`` feeding ``cp`` (a ControlPlane): the
    registry, Istio/Gateway API config and a node per injected pod. None outside a cluster."""
    cfg = config or in_cluster()
    if cfg is None:
        return None
    watcher = KubeWatcher.in_cluster(
        cfg, trust_domain=cp.mesh.trust_domain,
        on_registry=cp.registry_source("kubernetes"),
        on_config=cp.config_source("kubernetes"),
        on_proxies=ProxySync(cp),
    )
    use_token_review(cp, TokenReviewer(
        cfg.base_url, cfg.token_file, ca_file=cfg.ca_file if Path(cfg.ca_file).is_file() else None))
    log.info("in a Kubernetes pod: watching %s (Services, EndpointSlices, Pods, Istio and "
             "Gateway API resources); sidecars authenticate, and get workload certificates, with "
             "their service-account token",
             cfg.base_url)
    return watcher, asyncio.get_running_loop().create_task(watcher.run(), name="kubernetes-watch")
