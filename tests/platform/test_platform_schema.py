"""docs/mesh.schema.json is generated from the mesh file model; the Bookinfo mesh file loads."""

from __future__ import annotations

import json
import os
from pathlib import Path

from diktyo.platform.mesh import json_schema, load_mesh

ROOT = Path(__file__).resolve().parents[2]


def test_schema_file_is_current() -> None:
    path = ROOT / "docs" / "mesh.schema.json"
    current = json.dumps(json_schema(), indent=2) + "\n"
    if os.environ.get("DIKTYO_REFRESH_GOLDEN"):
        path.write_text(current)
    assert path.read_text() == current, "regenerate with DIKTYO_REFRESH_GOLDEN=1"


def test_bookinfo_mesh_file() -> None:
    spec = load_mesh(ROOT / "samples" / "bookinfo" / "mesh.yaml")
    assert [w.name for w in spec.workloads] == [
        "productpage-v1",
        "details-v1",
        "reviews-v1",
        "reviews-v2",
        "reviews-v3",
        "ratings-v1",
    ]
    reviews = next(w for w in spec.workloads if w.name == "reviews-v2")
    assert [s.name for s in spec.services_of(reviews)] == ["reviews"]
    assert spec.gateways[0].labels["istio"] == "ingressgateway"
    assert spec.services[0].ports[0].protocol == "HTTP"


def test_protocol_from_istio_port_name_or_app_protocol() -> None:
    from diktyo.platform.mesh import PortSpec

    cases = {
        "http": "HTTP",
        "http-web": "HTTP",
        "http2-x": "HTTP2",
        "grpc": "GRPC",
        "grpc-web": "HTTP",
        "tcp-db": "TCP",
        "tls": "TLS",
        "https-api": "HTTPS",
        "redis": "TCP",
        "web": "HTTP",
    }
    for name, proto in cases.items():
        assert PortSpec(name=name, port=1).protocol == proto, name
    assert PortSpec(name="web", port=1, app_protocol="grpc").protocol == "GRPC"
