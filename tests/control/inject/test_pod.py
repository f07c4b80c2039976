"""inject_pod policy and mutation details (Istio's semantics), beyond the golden files."""

from __future__ import annotations

import json
from typing import Any

import pytest

from diktyo.control.inject.config import InjectConfig
from diktyo.control.inject.pod import inject_pod, injection_required


def _pod(**meta: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web-1", "namespace": "default", **meta},
            "spec": {"containers": [{"name": "web", "image": "web:1",
                                     "ports": [{"name": "http-web", "containerPort": 8080}]}]}}


@pytest.mark.parametrize(
    ("pod", "ns_labels", "want"),
    [
        (_pod(), {"istio-injection": "enabled"}, True),
        (_pod(), {"diktyo-injection": "enabled"}, True),
        (_pod(), {}, False),
        (_pod(), {"istio-injection": "disabled"}, False),
        (_pod(), None, True),  # webhook: the namespaceSelector already matched
        (_pod(labels={"sidecar.istio.io/inject": "true"}), {}, True),
        (_pod(annotations={"sidecar.istio.io/inject": "false"}), {"istio-injection": "enabled"}, False),
        # the label wins over the annotation (Istio)
        (_pod(labels={"sidecar.istio.io/inject": "true"},
              annotations={"sidecar.istio.io/inject": "false"}), {}, True),
        (_pod(namespace="kube-system"), None, False),
    ],
)
def test_policy(pod: dict[str, Any], ns_labels: dict[str, str] | None, want: bool) -> None:
    got, reason = injection_required(pod, InjectConfig(), namespace_labels=ns_labels)
    assert got is want, reason
    injected = inject_pod(pod, namespace_labels=ns_labels)
    names = [c["name"] for c in injected["spec"]["containers"]]
    assert ("diktyo-proxy" in names) is want


def test_host_network_pods_are_left_alone() -> None:
    pod = _pod()
    pod["spec"]["hostNetwork"] = True
    assert inject_pod(pod) == pod
    assert injection_required(pod)[1] == "pod uses the host network"


def test_input_not_mutated_and_proxy_shape() -> None:
    pod = _pod(labels={"app": "web", "version": "v2"})
    before = json.dumps(pod, sort_keys=True)
    cfg = InjectConfig(control_plane="http://cp.mesh.svc:15010", admin_port=15000)
    out = inject_pod(pod, cfg)
    assert json.dumps(pod, sort_keys=True) == before
    proxy = out["spec"]["containers"][-1]
    assert proxy["name"] == "diktyo-proxy"
    assert proxy["args"] == ["sidecar"]  # everything else comes from the environment
    # the kubelet probes Istio's readiness port on the pod IP (the admin port is private)
    assert proxy["readinessProbe"]["httpGet"] == {"path": "/healthz/ready", "port": 15021}
    env = {e["name"]: e for e in proxy["env"]}
    assert env["DIKTYO_CONTROL_PLANE"]["value"] == "http://cp.mesh.svc:15010"
    assert env["DIKTYO_ADMIN_ADDRESS"]["value"] == "127.0.0.1"
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    ports = json.loads(env["DIKTYO_META_POD_PORTS"]["value"])
    assert ports == [{"containerPort": 8080, "name": "http-web", "protocol": "TCP", "meshProtocol": "HTTP"}]
    assert out["spec"]["initContainers"][0]["name"] == "diktyo-init"
    assert "NET_ADMIN" in out["spec"]["initContainers"][0]["securityContext"]["capabilities"]["add"]
    status = json.loads(out["metadata"]["annotations"]["sidecar.istio.io/status"])
    assert status["containers"] == ["diktyo-proxy"] and status["initContainers"] == ["diktyo-init"]
    assert {v["name"] for v in out["spec"]["volumes"]} == set(status["volumes"])
    labels = out["metadata"]["labels"]
    assert labels["service.istio.io/canonical-name"] == "web"
    assert labels["service.istio.io/canonical-revision"] == "v2"
    assert labels["security.istio.io/tlsMode"] == "istio"


def test_user_prometheus_annotations_are_kept() -> None:
    pod = _pod(annotations={"prometheus.io/port": "9102"})
    assert inject_pod(pod)["metadata"]["annotations"]["prometheus.io/port"] == "9102"


def test_excluded_inbound_ports_from_annotation() -> None:
    pod = _pod(annotations={"traffic.sidecar.istio.io/excludeInboundPorts": "8081"})
    args = inject_pod(pod)["spec"]["initContainers"][0]["args"]
    assert args[args.index("-d") + 1] == "15000,15090,15021,15020,8081"


def test_injected_commands_parse_with_diktyos_parser() -> None:
    from diktyo.cli.main import build_parser
    from diktyo.cli.sidecar import resolve

    out = inject_pod(_pod(), InjectConfig(log_level="info"))
    proxy = out["spec"]["containers"][-1]
    assert proxy["command"] == ["diktyo"]
    args = build_parser().parse_args(proxy["args"])
    env = {e["name"]: e.get("value", "") for e in proxy["env"]}
    env.update(POD_NAME="web-1", POD_NAMESPACE="default", INSTANCE_IP="10.0.0.7")
    settings = resolve(args, env)  # what the sidecar makes of its command line + environment
    assert args.command == "sidecar" and settings["node"] == "web-1.default"
    assert settings["admin_port"] == 15000 and "outbound_port" not in settings
    assert settings["log_level"] == "info" and settings["status_port"] == 15020
    init = out["spec"]["initContainers"][0]
    assert init["command"] == ["diktyo"] and init["args"][:2] == ["init", "--apply"]


@pytest.mark.parametrize(
    ("annotations", "needle"),
    [
        ({"traffic.sidecar.istio.io/excludeOutboundIPRanges": "10.0.0.0/33"}, "not an IP range"),
        ({"traffic.sidecar.istio.io/includeOutboundIPRanges": "10.0.0.0/8\nRULES\nreboot"}, "not an IP range"),
        ({"traffic.sidecar.istio.io/excludeOutboundIPRanges": "fd00::/8"}, "IPv6"),
        ({"traffic.sidecar.istio.io/includeInboundPorts": "80,0"}, "'0' is not a port"),
        ({"traffic.sidecar.istio.io/excludeOutboundPorts": "65536"}, "'65536' is not a port"),
    ],
)
def test_bad_capture_annotations_are_refused(annotations: dict[str, str], needle: str) -> None:
    from diktyo.control.inject.pod import InjectionError

    with pytest.raises(InjectionError, match=needle):
        inject_pod(_pod(annotations=annotations))


def test_cidrs_are_normalised() -> None:
    pod = _pod(annotations={"traffic.sidecar.istio.io/includeOutboundIPRanges": " 10.1.2.3/8 , 172.16.0.0/12"})
    args = inject_pod(pod)["spec"]["initContainers"][0]["args"]
    assert args[args.index("-i") + 1] == "10.0.0.0/8,172.16.0.0/12"


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda p: p["metadata"].update(labels=["a"]), "metadata.labels"),
        (lambda p: p["metadata"].update(annotations={"a": 1}), "metadata.annotations"),
        (lambda p: p["spec"].update(containers="web"), "spec.containers"),
        (lambda p: p["spec"]["containers"][0].update(ports=[{"containerPort": "80"}]), "ports"),
        (lambda p: p.update(spec=None), "not a Pod"),
    ],
)
def test_wrong_pod_shapes_are_refused(mutate: Any, needle: str) -> None:
    from diktyo.control.inject.pod import InjectionError

    pod = _pod()
    mutate(pod)
    with pytest.raises(InjectionError, match=needle):
        inject_pod(pod)


def test_interception_mode_none_adds_no_capture() -> None:
    """Istio's template: interceptionMode NONE -> no capture init container; the sidecar is told."""
    from diktyo.control.inject.pod import InjectionError

    out = inject_pod(_pod(annotations={"sidecar.istio.io/interceptionMode": "NONE"}))
    assert [c["name"] for c in out["spec"].get("initContainers") or []] == []
    env = {e["name"]: e.get("value") for e in out["spec"]["containers"][-1]["env"]}
    assert env["DIKTYO_INTERCEPTION_MODE"] == "NONE"
    assert json.loads(out["metadata"]["annotations"]["sidecar.istio.io/status"])["initContainers"] == []
    default = inject_pod(_pod())
    assert [c["name"] for c in default["spec"]["initContainers"]] == ["diktyo-init"]
    assert {e["name"]: e.get("value") for e in default["spec"]["containers"][-1]["env"]}[
        "DIKTYO_INTERCEPTION_MODE"] == "REDIRECT"
    with pytest.raises(InjectionError, match="interceptionMode: 'TPROXY' is not supported"):
        inject_pod(_pod(annotations={"sidecar.istio.io/interceptionMode": "TPROXY"}))
