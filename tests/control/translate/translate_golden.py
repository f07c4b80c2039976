"""Golden-test harness for translate: ``testdata/<case>.in.yaml`` -> ``<case>.out.yaml``.

Input format: a multi-document YAML file whose first document describes the proxy and the
registry (``apiVersion: diktyo.test/v1``, ``kind: TestProxy``); the other documents are Istio
resources. ``include`` lists more Istio YAML files, relative to the repository root::

    apiVersion: diktyo.test/v1
    kind: TestProxy
    node: {workload: productpage-v1, labels: {app: productpage, version: v1}, mode: sidecar}
    outboundPort: 15001
    inbound: [{servicePort: 9080, listenPort: 15006, appPort: 9081}]
    localPorts: {"httpbin.org:80": 15100}
    gatewayPorts: {8080: 18080}
    services:                     # short name -> ports (name: number) and versions
      reviews: {ports: {http: 9080}, versions: [v1, v2, v3]}
    include: [samples/bookinfo/networking/destination-rule-all.yaml]

Each version of a service gets one instance ``<svc>-<version>-1`` on 127.0.0.1 with a sidecar
(ports 20000, 20001, ... in order of appearance). Output: the snapshot as YAML
(``diktyo.snapshot.to_builtins``). Refresh with ``DIKTYO_REFRESH_GOLDEN=1``.
"""

from __future__ import annotations

import difflib
import io
import os
from pathlib import Path

from ruamel.yaml import YAML

from diktyo.api import load_text
from diktyo.control.model import (
    InboundPort,
    ProxyNode,
    PushContext,
    Registry,
    Service,
    ServicePort,
    WorkloadInstance,
)
from diktyo.control.translate import translate
from diktyo.snapshot import from_builtins, to_builtins
from diktyo.snapshot.model import Node, Snapshot

REPO = Path(__file__).resolve().parents[3]
TESTDATA = Path(__file__).resolve().parent / "testdata"


def build_case(path: Path) -> tuple[ProxyNode, PushContext]:
    text = path.read_text()
    head = next(YAML(typ="safe").load_all(text))
    assert head.get("kind") == "TestProxy", f"{path}: first document must be kind: TestProxy"
    rel = str(path.relative_to(REPO))
    result = load_text(text, rel)
    for inc in head.get("include", []):
        result.extend(load_text((REPO / inc).read_text(), inc))
    errors = [str(e) for e in result.errors if e.severity == "error"]
    assert not errors, "\n".join(errors)
    n = head.get("node", {})
    workload = n.get("workload", "test")
    ns = n.get("namespace", "default")
    node = Node(
        id=n.get("id", f"{workload}-1.{ns}"),
        workload=workload,
        namespace=ns,
        labels=dict(n.get("labels", {})),
        service_account=n.get("serviceAccount", "default"),
        mode=n.get("mode", "sidecar"),
        services=tuple(n.get("services", ())),
    )
    services: list[Service] = []
    instances: list[WorkloadInstance] = []
    next_port = 20000
    for name, spec in (head.get("services") or {}).items():
        sns = spec.get("namespace", "default")
        fqdn = f"{name}.{sns}.svc.cluster.local"
        ports = tuple(
            ServicePort(number=num, name=pname, protocol=pname.split("-")[0].upper())
            for pname, num in spec.get("ports", {"http": 9080}).items()
        )
        services.append(Service(hostname=fqdn, namespace=sns, ports=ports, short_name=name))
        for version in spec.get("versions", ["v1"]):
            port_map = {}
            for p in ports:
                port_map[p.number] = next_port
                next_port += 1
            instances.append(
                WorkloadInstance(
                    name=f"{name}-{version}-1",
                    workload=f"{name}-{version}",
                    address="127.0.0.1",
                    ports=port_map,
                    services=(fqdn,),
                    namespace=sns,
                    labels={"app": name, "version": version},
                    service_account=f"bookinfo-{name}",
                    has_sidecar=True,
                )
            )
    proxy = ProxyNode(
        node=node,
        outbound_port=head.get("outboundPort", 0),
        inbound=tuple(
            InboundPort(
                service_port=i["servicePort"], listen_port=i["listenPort"], app_port=i["appPort"]
            )
            for i in head.get("inbound", [])
        ),
        local_ports=dict(head.get("localPorts", {})),
        gateway_ports={int(k): v for k, v in (head.get("gatewayPorts") or {}).items()},
    )
    push = PushContext(
        resources=tuple(result.resources),
        registry=Registry(services=tuple(services), instances=tuple(instances)),
        version="golden",
    )
    return proxy, push


def translate_case(path: Path) -> Snapshot:
    proxy, push = build_case(path)
    snap = translate(proxy, push)
    # the snapshot must pass the wire format's validation
    assert from_builtins(to_builtins(snap)) == snap
    return snap


def dump(snap: Snapshot) -> str:
    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style = False
    yaml.sort_base_mapping_type_on_output = False  # type: ignore[attr-defined]
    buf = io.StringIO()
    yaml.dump(to_builtins(snap), buf)
    return buf.getvalue()


def check_golden(case: str) -> Snapshot:
    src = TESTDATA / f"{case}.in.yaml"
    out = TESTDATA / f"{case}.out.yaml"
    snap = translate_case(src)
    got = dump(snap)
    if os.environ.get("DIKTYO_REFRESH_GOLDEN") == "1":
        out.write_text(got)
        return snap
    if not out.exists():
        raise AssertionError(f"{out} missing: run with DIKTYO_REFRESH_GOLDEN=1 to create it")
    want = out.read_text()
    if got != want:
        diff = "".join(
            difflib.unified_diff(
                want.splitlines(keepends=True),
                got.splitlines(keepends=True),
                fromfile=str(out.relative_to(REPO)),
                tofile="translate()",
            )
        )
        raise AssertionError(
            f"golden mismatch for {case} (DIKTYO_REFRESH_GOLDEN=1 to accept):\n{diff}"
        )
    return snap


def cases() -> list[str]:
    return sorted(p.name[: -len(".in.yaml")] for p in TESTDATA.glob("*.in.yaml"))
