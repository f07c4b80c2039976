"""Where ``concurrency`` comes from: Istio's ``proxy.istio.io/config`` annotation (injector and
``diktyo up``), the mesh file's ``sidecar.concurrency`` (meshConfig.defaultConfig),
``DIKTYO_CONCURRENCY`` and ``--concurrency`` (with ``--help`` explaining it)."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from diktyo.control.inject.config import InjectConfig
from diktyo.control.inject.pod import PROXY, InjectionError, inject_pod
from diktyo.core.proxy_config import annotation_concurrency
from diktyo.platform.mesh import load_mesh_text
from diktyo.platform.supervisor import LocalMesh, Replica
from diktyo.proxy.env import EnvError, sidecar_env

POD: dict[str, Any] = {
    "apiVersion": "v1", "kind": "Pod",
    "metadata": {"name": "web", "namespace": "shop", "labels": {"app": "web"}},
    "spec": {"containers": [{"name": "web", "image": "web:1"}]},
}  # fmt: skip


def test_annotation_reads_json_and_yaml_proxyconfig() -> None:
    key = "proxy.istio.io/config"
    assert annotation_concurrency({key: '{"concurrency": 2}'}) == 2
    assert annotation_concurrency({key: "concurrency: 0\nholdApplicationUntilProxyStarts: true"}) == 0
    assert annotation_concurrency({key: "holdApplicationUntilProxyStarts: true"}) is None
    assert annotation_concurrency({}) is None and annotation_concurrency(None) is None
    with pytest.raises(ValueError, match=r"proxy.istio.io/config: concurrency -1 is not"):
        annotation_concurrency({key: '{"concurrency": -1}'})
    with pytest.raises(ValueError, match=r"concurrency 'two' is not a number of worker"):
        annotation_concurrency({key: "concurrency: two"})
    with pytest.raises(ValueError, match="expected a ProxyConfig mapping"):
        annotation_concurrency({key: "[1, 2]"})


def _proxy_env(pod: dict[str, Any]) -> dict[str, str]:
    out = inject_pod(pod)
    (proxy,) = [c for c in out["spec"]["containers"] if c["name"] == PROXY]
    return {e["name"]: e["value"] for e in proxy["env"] if "value" in e}


def test_injector_passes_the_annotation_to_the_sidecar_env() -> None:
    assert "DIKTYO_CONCURRENCY" not in _proxy_env(POD)  # unset: the sidecar's default
    pod = {**POD, "metadata": {**POD["metadata"],
                               "annotations": {"proxy.istio.io/config": '{"concurrency": 2}'}}}
    env = _proxy_env(pod)
    assert env["DIKTYO_CONCURRENCY"] == "2"
    assert sidecar_env(env)["concurrency"] == 2
    bad = {**POD, "metadata": {**POD["metadata"],
                               "annotations": {"proxy.istio.io/config": '{"concurrency": 99}'}}}
    with pytest.raises(InjectionError, match="concurrency 99"):
        inject_pod(bad)
    # the mesh-wide default (meshConfig.defaultConfig.concurrency); the annotation still wins
    mesh_wide = InjectConfig(concurrency=0)
    (proxy,) = [c for c in inject_pod(POD, mesh_wide)["spec"]["containers"] if c["name"] == PROXY]
    assert {"name": "DIKTYO_CONCURRENCY", "value": "0"} in proxy["env"]
    (proxy,) = [c for c in inject_pod(pod, mesh_wide)["spec"]["containers"] if c["name"] == PROXY]
    assert {"name": "DIKTYO_CONCURRENCY", "value": "2"} in proxy["env"]


def test_env_value_is_checked() -> None:
    assert sidecar_env({"DIKTYO_CONCURRENCY": "0"})["concurrency"] == 0
    with pytest.raises(EnvError, match="DIKTYO_CONCURRENCY='x': expected a number of worker"):
        sidecar_env({"DIKTYO_CONCURRENCY": "x"})


MESH = """
apiVersion: diktyo.io/v1alpha1
kind: Mesh
name: m
sidecar:
  concurrency: 2
services:
  - name: a
    ports: [{name: http, port: 80}]
workloads:
  - name: a
    labels: {app: a}
    command: ["true"]
  - name: b
    command: ["true"]
    annotations:
      proxy.istio.io/config: |
        concurrency: 1
"""


def test_mesh_default_and_workload_annotation_reach_the_sidecar_env() -> None:
    mesh = LocalMesh(load_mesh_text(MESH))

    def env(workload: str, gateway: bool = False) -> dict[str, str]:
        rep = Replica(f"{workload}-1", workload, "default", "", None, 0,  # type: ignore[arg-type]
                      is_gateway=gateway)  # fmt: skip
        return mesh._proxy_env(rep)

    assert env("a") == {"DIKTYO_CONCURRENCY": "2"}  # the mesh-wide default
    assert env("b") == {"DIKTYO_CONCURRENCY": "1"}  # its annotation wins
    assert env("istio-ingressgateway", gateway=True) == {"DIKTYO_CONCURRENCY": "2"}
    assert LocalMesh(load_mesh_text(MESH.replace("sidecar:\n  concurrency: 2\n", "")))._proxy_env(
        Replica("a-1", "a", "default", "", None, 0)  # type: ignore[arg-type]
    ) == {}  # unset everywhere: the sidecar's own default


def test_mesh_file_rejects_a_bad_annotation_when_loading() -> None:
    bad = MESH.replace("concurrency: 1", "concurrency: many")
    with pytest.raises(ValueError, match="concurrency 'many'"):
        load_mesh_text(bad)
    with pytest.raises(ValueError, match="concurrency"):
        load_mesh_text(MESH.replace("concurrency: 2", "concurrency: 65"))


def test_help_explains_the_flag() -> None:
    out = subprocess.run([sys.executable, "-m", "diktyo.proxy", "--help"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    text = " ".join(out.split())
    assert "--concurrency N" in text and "0 = one per core, default 1" in text
    assert "DIKTYO_CONCURRENCY" in text


PROXY_CONFIGS = """
apiVersion: networking.istio.io/v1beta1
kind: ProxyConfig
metadata: {name: mesh-wide, namespace: istio-system}
spec: {concurrency: 0}
---
apiVersion: networking.istio.io/v1beta1
kind: ProxyConfig
metadata: {name: for-a, namespace: default}
spec:
  selector: {matchLabels: {app: a}}
  concurrency: 3
"""


def test_proxyconfig_resources_follow_istios_precedence() -> None:
    from diktyo.api import load_text
    from diktyo.control.model import ProxyNode
    from diktyo.snapshot.model import Node

    loaded = load_text(PROXY_CONFIGS, "proxyconfig.yaml")
    assert loaded.ok, loaded.errors
    mesh = LocalMesh(load_mesh_text(MESH))
    mesh.cp.store.set_source("test", loaded.resources, [])

    def env(workload: str, labels: dict[str, str]) -> dict[str, str]:
        node = Node(id=f"{workload}-1.default", workload=workload, namespace="default",
                    labels=labels)  # fmt: skip
        return mesh._proxy_env(Replica(f"{workload}-1", workload, "default", "",
                                       ProxyNode(node=node), 0))  # fmt: skip

    # Istio's EffectiveProxyConfig, lowest first: meshConfig.defaultConfig (the mesh file's
    # sidecar.concurrency: 2), mesh-wide ProxyConfig (0), namespace ProxyConfig, the pod's
    # annotation, a ProxyConfig selecting the workload
    assert env("a", {"app": "a"}) == {"DIKTYO_CONCURRENCY": "3"}  # its workload ProxyConfig
    assert env("b", {"app": "b"}) == {"DIKTYO_CONCURRENCY": "1"}  # annotation over mesh-wide
    assert env("c", {"app": "c"}) == {"DIKTYO_CONCURRENCY": "0"}  # mesh-wide over the file
    ns_text = PROXY_CONFIGS.replace("name: mesh-wide, namespace: istio-system",
                                    "name: ns, namespace: default")  # fmt: skip
    ns = load_text(ns_text.replace("{concurrency: 0}", "{concurrency: 4}"), "ns.yaml")
    mesh.cp.store.set_source("test", [*loaded.resources, *ns.resources], [])
    assert env("c", {"app": "c"}) == {"DIKTYO_CONCURRENCY": "4"}  # namespace over mesh-wide
    assert env("a", {"app": "a"}) == {"DIKTYO_CONCURRENCY": "3"}
