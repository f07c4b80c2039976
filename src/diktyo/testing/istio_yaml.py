"""Istio YAML for tests that run ``diktyo sidecar --config DIR`` against fake upstreams."""

from __future__ import annotations

from collections.abc import Mapping


def static_service_entry(host: str, endpoints: int | Mapping[str, int]) -> str:
    """A STATIC, MESH_INTERNAL ServiceEntry for ``host`` on port 9080 (``http``), in
    ``default``: one endpoint on 127.0.0.1:``endpoints``, or one per version
    (``{"v1": port, ...}``, each labelled ``version: v1``, ...)."""
    if isinstance(endpoints, int):
        eps = f"  - {{address: 127.0.0.1, ports: {{http: {endpoints}}}}}\n"
    else:
        eps = "".join(
            f"  - {{address: 127.0.0.1, ports: {{http: {port}}}, labels: {{version: {v}}}}}\n"
            for v, port in endpoints.items()
        )
    return (
        "apiVersion: networking.istio.io/v1\n"
        "kind: ServiceEntry\n"
        f"metadata: {{name: {host}, namespace: default}}\n"
        "spec:\n"
        f"  hosts: [{host}]\n"
        "  ports: [{number: 9080, name: http, protocol: HTTP}]\n"
        "  resolution: STATIC\n"
        "  location: MESH_INTERNAL\n"
        "  endpoints:\n" + eps
    )


def reviews_by_user(v1: int, v2: int) -> str:
    """Bookinfo's reviews with v1 and v2 endpoints, subsets, and a VirtualService sending
    ``end-user: jason`` to v2 (rule ``jason``) and everything else to v1 (rule ``default``)."""
    return static_service_entry("reviews", {"v1": v1, "v2": v2}) + (
        "---\n"
        "apiVersion: networking.istio.io/v1\n"
        "kind: DestinationRule\n"
        "metadata: {name: reviews, namespace: default}\n"
        "spec:\n"
        "  host: reviews\n"
        "  subsets:\n"
        "  - {name: v1, labels: {version: v1}}\n"
        "  - {name: v2, labels: {version: v2}}\n"
        "---\n"
        "apiVersion: networking.istio.io/v1\n"
        "kind: VirtualService\n"
        "metadata: {name: reviews, namespace: default}\n"
        "spec:\n"
        "  hosts: [reviews]\n"
        "  http:\n"
        "  - name: jason\n"
        "    match:\n"
        "    - headers: {end-user: {exact: jason}}\n"
        "    route:\n"
        "    - destination: {host: reviews, subset: v2}\n"
        "  - name: default\n"
        "    route:\n"
        "    - destination: {host: reviews, subset: v1}\n"
    )
