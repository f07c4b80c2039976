"""Small snapshot builders for tests: services with endpoints, one outbound listener, optional routes."""

from __future__ import annotations

from typing import Any

from diktyo.snapshot.codec import from_builtins
from diktyo.snapshot.model import Snapshot, cluster_name


def outbound_cluster(service: str, port: int = 80, subset: str = "") -> str:
    """``snapshot.model.cluster_name`` with the argument order tests find handy."""
    return cluster_name(port, subset, service)


def http_snapshot(
    services: dict[str, list[tuple[str, int]]],
    *,
    routes: dict[str, list[dict[str, Any]]] | None = None,
    clusters: dict[str, dict[str, Any]] | None = None,
    extra_clusters: list[dict[str, Any]] | None = None,
    listeners: list[dict[str, Any]] | None = None,
    mesh: dict[str, Any] | None = None,
    version: str = "1",
    port: int = 80,
) -> Snapshot:
    """One outbound listener ``outbound`` routing ``http://NAME[:port]`` to each service.

    ``routes[name]``: the virtual host's routes (snapshot ``Route`` dicts); default one route
    to ``outbound|port||name``. ``clusters[name]``: extra fields for that cluster (``pool``,
    ``outlier``, ``lb``, ...).
    """
    routes = routes or {}
    clusters = clusters or {}
    cls: list[dict[str, Any]] = []
    vhs: list[dict[str, Any]] = []
    for name, eps in services.items():
        cname = outbound_cluster(name, port)
        c: dict[str, Any] = {
            "name": cname,
            "service": name,
            "port": port,
            "endpoints": [
                {
                    "address": a,
                    "port": p,
                    "workload": f"{name}-v1",
                    "labels": {"app": name, "version": "v1"},
                }
                for a, p in eps
            ],
        }
        c.update(clusters.get(name, {}))
        cls.append(c)
        vhs.append(
            {
                "name": name,
                "domains": [name, f"{name}:{port}"],
                "routes": routes.get(name)
                or [{"name": "default", "clusters": [{"cluster": cname, "host": name}]}],
            }
        )
    cls.extend(extra_clusters or [])
    lst = [{"name": "outbound", "direction": "outbound", "port": 0, "route_table": "outbound"}]
    lst.extend(listeners or [])
    obj: dict[str, Any] = {
        "version": version,
        "node": {"id": "test.default", "workload": "test", "labels": {"app": "test"}},
        "listeners": lst,
        "route_tables": [{"name": "outbound", "virtual_hosts": vhs}],
        "clusters": cls,
    }
    if mesh:
        obj["mesh"] = mesh
    return from_builtins(obj)
