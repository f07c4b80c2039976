"""The live service registry: services and workload instances that join, leave and fail health checks.

Mutable on purpose (it is the control plane's state); each change bumps ``generation`` and calls
``on_change`` so the server debounces and pushes. ``view()`` is the immutable ``Registry`` that
goes into a ``PushContext``: unhealthy instances are left out, so they leave every endpoint list.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from diktyo.control.model import Registry, Service, WorkloadInstance


class LiveRegistry:
    def __init__(self, on_change: Callable[[], None] | None = None) -> None:
        self.services: dict[str, Service] = {}  # by hostname
        self.instances: dict[str, WorkloadInstance] = {}  # by instance name
        self.admin_urls: dict[str, str] = {}  # instance name -> sidecar admin base URL
        self.on_change = on_change
        self.generation = 0
        self.sources: dict[str, Registry] = {}  # external registries (kubernetes, ...) by name

    def _changed(self) -> None:
        self.generation += 1
        if self.on_change is not None:
            self.on_change()

    def add_service(self, service: Service) -> None:
        if self.services.get(service.hostname) != service:
            self.services[service.hostname] = service
            self._changed()

    def remove_service(self, hostname: str) -> bool:
        if self.services.pop(hostname, None) is None:
            return False
        self._changed()
        return True

    def add_instance(self, instance: WorkloadInstance, admin_url: str | None = None) -> None:
        """Join (or update) an instance; ``admin_url`` enables health checks of its sidecar."""
        if admin_url:
            self.admin_urls[instance.name] = admin_url.rstrip("/")
        if self.instances.get(instance.name) != instance:
            self.instances[instance.name] = instance
            self._changed()

    def remove_instance(self, name: str) -> bool:
        self.admin_urls.pop(name, None)
        if self.instances.pop(name, None) is None:
            return False
        self._changed()
        return True

    def set_healthy(self, name: str, healthy: bool) -> bool:
        """Mark an instance (un)healthy; True if that changed anything."""
        inst = self.instances.get(name)
        if inst is None or inst.healthy == healthy:
            return False
        self.instances[name] = dataclasses.replace(inst, healthy=healthy)
        self._changed()
        return True

    async def flush(self) -> None:
        """Wait until every change is stored (in memory: at once; ``EtcdRegistry``: in etcd)."""

    def set_source(self, name: str, registry: Registry) -> None:
        """Replace the whole registry of an external source (e.g. a Kubernetes watcher)."""
        if self.sources.get(name) != registry:
            self.sources[name] = registry
            self._changed()

    def view(self) -> Registry:
        """Own services and healthy instances, then those of external sources (own hosts win)."""
        services = {k: self.services[k] for k in sorted(self.services)}
        instances = [self.instances[k] for k in sorted(self.instances) if self.instances[k].healthy]
        for name in sorted(self.sources):
            src = self.sources[name]
            for svc in src.services:
                services.setdefault(svc.hostname, svc)
            instances.extend(i for i in src.instances if i.healthy)
        return Registry(services=tuple(services.values()), instances=tuple(instances))
