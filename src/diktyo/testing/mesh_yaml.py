"""diktyo ``Mesh`` files for tests that run a whole local mesh (``MeshThread``)."""

from __future__ import annotations

import sys
from pathlib import Path


def hello_front_mesh(name: str, hello_app: Path, front_app: Path) -> str:
    """Two services on port 9080 (``http``), ``hello`` and ``front``, each one workload (``v1``,
    service accounts ``hello-sa`` / ``front-sa``) running a Python script with this
    interpreter: the smallest mesh with a sidecar-to-sidecar hop."""
    return f"""
name: {name}
services:
  - name: hello
    ports: [{{name: http, port: 9080}}]
  - name: front
    ports: [{{name: http, port: 9080}}]
workloads:
  - name: hello
    labels: {{app: hello, version: v1}}
    serviceAccount: hello-sa
    command: ["{sys.executable}", "{hello_app}"]
  - name: front
    labels: {{app: front, version: v1}}
    serviceAccount: front-sa
    command: ["{sys.executable}", "{front_app}"]
"""
