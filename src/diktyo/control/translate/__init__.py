"""Translate: the pure function ``translate(proxy, push) -> Snapshot`` (Istio's config generator).

``listeners.py``, ``routes.py`` and ``clusters.py`` each build what they are named after;
``hosts.py`` resolves names and indexes config; ``registry.py`` turns ServiceEntries into
registry services and instances.
"""

from __future__ import annotations

from diktyo.control.model import ProxyNode, PushContext
from diktyo.control.translate.cache import PushTranslator
from diktyo.control.translate.registry import merge_registries, registry_from_service_entries
from diktyo.snapshot.model import Snapshot

__all__ = ["PushTranslator", "merge_registries", "registry_from_service_entries", "translate"]


def translate(proxy: ProxyNode, push: PushContext) -> Snapshot:
    """Build the snapshot for ``proxy`` from ``push`` (pure: same input, same output).

    ServiceEntries among ``push.resources`` are added to ``push.registry`` (hosts the registry
    already has win). Every route target gets a cluster; a target whose service or subset is
    unknown gets an empty cluster (requests to it fail with 503, as in Istio). The security
    part (PeerAuthentication, AuthorizationPolicy, RequestAuthentication selecting this node)
    comes from ``diktyo.security.translate.build_security``.

    This is the control plane's generator (``cache.PushTranslator``) with nothing shared: a
    fresh generator per call, so there is one assembler, not a reference copy beside it.
    """
    return PushTranslator().build(proxy, push).snapshot
