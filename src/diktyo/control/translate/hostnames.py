"""Host names: Istio's short-name resolution, wildcard matching, cluster-local names.

Pure functions of strings (and the registry's services). Kept apart from ``hosts.ConfigIndex``
so that ``registry`` can use them while ``ConfigIndex`` uses ``registry``, without an import
cycle.
"""

from __future__ import annotations

from collections.abc import Iterable

from diktyo.control.model import Service

DOMAIN_SUFFIX = "cluster.local"


def resolve_host(host: str, namespace: str, services: Iterable[Service] = ()) -> str:
    """Istio's short-name resolution: ``reviews`` in namespace ``default`` ->
    ``reviews.default.svc.cluster.local``. ``reviews.default`` and ``reviews.default.svc`` are
    completed too when such a service exists; anything else is taken as written."""
    if "*" in host:
        return host
    if "." not in host:
        return f"{host}.{namespace}.svc.{DOMAIN_SUFFIX}"
    for svc in services:
        if svc.hostname == host:
            return host
    parts = host.split(".")
    if len(parts) == 2:
        cand = f"{host}.svc.{DOMAIN_SUFFIX}"
    elif len(parts) == 3 and parts[2] == "svc":
        cand = f"{host}.{DOMAIN_SUFFIX}"
    else:
        return host
    if any(svc.hostname == cand for svc in services):
        return cand
    return host


def host_matches(pattern: str, hostname: str) -> bool:
    """``pattern`` (an FQDN, ``*`` or ``*.suffix``) covers ``hostname`` (which may be a wildcard)."""
    if pattern == "*" or pattern == hostname:
        return True
    if pattern.startswith("*."):
        suffix = pattern[1:]
        if hostname.startswith("*."):
            return hostname[1:].endswith(suffix)
        return hostname.endswith(suffix)
    return False


def split_cluster_host(hostname: str) -> tuple[str, str] | None:
    """``reviews.default.svc.cluster.local`` -> ``("reviews", "default")``; None if external."""
    suffix = f".svc.{DOMAIN_SUFFIX}"
    if not hostname.endswith(suffix):
        return None
    parts = hostname[: -len(suffix)].split(".")
    if len(parts) != 2:
        return None
    return parts[0], parts[1]
