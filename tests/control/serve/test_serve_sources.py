"""External sources (a Kubernetes watcher, etcd) feed the control plane's registry and config."""

from __future__ import annotations

from diktyo.api import load_text
from diktyo.control.model import Registry, Service, ServicePort, WorkloadInstance
from diktyo.control.server import ControlPlane
from diktyo.testing import eventually

OWN = Service(hostname="a.default.svc.cluster.local", short_name="a", ports=(ServicePort(9080),))
KUBE = Service(hostname="b.default.svc.cluster.local", short_name="b", ports=(ServicePort(9080),))
VS = """apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: b}
spec:
  hosts: [b]
  http:
  - route:
    - destination: {host: b}
"""


async def test_registry_and_config_sources_merge_and_trigger_pushes(make_proxy) -> None:
    cp = ControlPlane(observability=False, debounce=0.01)
    await cp.start()
    try:
        cp.add_proxy(make_proxy(1))
        cp.registry.add_service(OWN)
        inst = WorkloadInstance(
            name="b-1",
            workload="b",
            address="127.0.0.1",
            ports={9080: 7001},
            services=(KUBE.hostname,),
        )
        sick = WorkloadInstance(
            name="b-2",
            workload="b",
            address="127.0.0.1",
            ports={9080: 7002},
            services=(KUBE.hostname,),
            healthy=False,
        )
        before = cp.pushes
        await cp.registry_source("kubernetes")(
            Registry(services=(KUBE, OWN), instances=(inst, sick))
        )
        view = cp.registry.view()
        assert [s.hostname for s in view.services] == [OWN.hostname, KUBE.hostname]
        assert [i.name for i in view.instances] == ["b-1"]  # unhealthy ones are left out
        result = load_text(VS, "kube:VirtualService/default/b")
        await cp.config_source("kubernetes")(result)
        assert [k[2] for k in cp.store.resource_keys()] == ["b"]

        def kube_endpoints() -> list[int] | None:
            entry = cp.cache.get("app-1.default")
            if entry is None:
                return None
            return [
                e.port
                for c in entry.snapshot.clusters
                if c.service == KUBE.hostname
                for e in c.endpoints
            ]

        # cp.pushes counts a push when it starts; its snapshots are installed once translated
        # (in a worker thread): wait for the snapshot, not the counter
        await eventually(
            lambda: cp.pushes > before and kube_endpoints() == [7001],
            timeout=10,
            what=lambda: f"a push of the change (b's endpoints: {kube_endpoints()})",
        )
    finally:
        await cp.stop()
