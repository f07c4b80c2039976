"""``diktyo kube-inject`` on multi-document manifests: the first case runs a real CLI process
(``python -m diktyo.cli.main``); the others call the same ``main(argv)`` in this process, with
stdin, stdout and stderr redirected (a new interpreter costs ~1 s of CPU per call)."""

from __future__ import annotations

import io
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from unittest import mock

from diktyo.cli.main import main
from diktyo.control.inject.manifest import load_docs

MANIFEST = """\
apiVersion: v1
kind: Service
metadata:
  name: details
spec:
  ports:
  - name: http
    port: 9080
  selector:
    app: details
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: details-v1
  namespace: bookinfo
spec:
  selector:
    matchLabels: {app: details, version: v1}
  template:
    metadata:
      labels: {app: details, version: v1}
    spec:
      containers:
      - name: details
        image: docker.io/istio/examples-bookinfo-details-v1:1.20.1
        ports:
        - containerPort: 9080
---
apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: db
spec:
  serviceName: db
  selector:
    matchLabels: {app: db}
  template:
    metadata:
      labels: {app: db}
      annotations:
        sidecar.istio.io/inject: "false"
    spec:
      containers:
      - name: db
        image: postgres:16
---
apiVersion: batch/v1
kind: CronJob
metadata:
  name: report
spec:
  schedule: "0 * * * *"
  jobTemplate:
    spec:
      template:
        spec:
          restartPolicy: Never
          containers:
          - name: report
            image: busybox:1.36
---
apiVersion: v1
kind: Pod
metadata:
  name: sleep
spec:
  containers:
  - name: sleep
    image: curlimages/curl:8.5.0
    command: ["sleep", "infinity"]
"""


def _process(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "diktyo.cli.main", "kube-inject", *args],
                          input=stdin, capture_output=True, text=True, timeout=60, check=False)


def _run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """``diktyo kube-inject ARGS`` in this process: exit status, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with mock.patch("sys.stdin", io.StringIO(stdin or "")), redirect_stdout(out), \
            redirect_stderr(err):  # fmt: skip
        try:
            code = main(["kube-inject", *args])
        except SystemExit as exc:  # argparse errors
            code = exc.code if isinstance(exc.code, int) else 1
    return subprocess.CompletedProcess(["diktyo", "kube-inject", *args], code, out.getvalue(),
                                       err.getvalue())  # fmt: skip


def _containers(spec: dict) -> list[str]:  # type: ignore[type-arg]
    return [c["name"] for c in spec["containers"]]


def test_multi_document_manifest(tmp_path: Path) -> None:
    path = tmp_path / "bookinfo.yaml"
    path.write_text(MANIFEST, encoding="utf-8")
    res = _process("-f", str(path), "--image", "registry.example.com/diktyo:1.0")
    assert res.returncode == 0, res.stderr
    svc, deploy, sts, cron, pod = load_docs(res.stdout)
    assert svc == load_docs(MANIFEST)[0]
    dspec = deploy["spec"]["template"]["spec"]
    assert _containers(dspec) == ["details", "diktyo-proxy"]
    assert dspec["initContainers"][0]["name"] == "diktyo-init"
    assert dspec["containers"][1]["image"] == "registry.example.com/diktyo:1.0"
    assert "name" not in deploy["spec"]["template"]["metadata"]
    assert deploy["spec"]["template"]["metadata"]["labels"]["service.istio.io/canonical-name"] == "details"
    assert _containers(sts["spec"]["template"]["spec"]) == ["db"]  # opted out
    assert _containers(cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]) == ["report", "diktyo-proxy"]
    assert _containers(pod["spec"]) == ["sleep", "diktyo-proxy"]


def test_stdin_and_output_file(tmp_path: Path) -> None:
    out = tmp_path / "out.yaml"
    res = _run("-f", "-", "-o", str(out), stdin=MANIFEST)
    assert res.returncode == 0, res.stderr
    assert res.stdout == ""
    docs = load_docs(out.read_text(encoding="utf-8"))
    assert len(docs) == 5
    # injecting the output again changes nothing (idempotent)
    again = _run("-f", str(out))
    assert load_docs(again.stdout) == docs


def test_errors_say_what_is_wrong(tmp_path: Path) -> None:
    res = _run("-f", str(tmp_path / "missing.yaml"))
    assert res.returncode == 1 and "cannot read" in res.stderr and "-f FILE" in res.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: Pod\n  spec: [\n", encoding="utf-8")
    res = _run("-f", str(bad))
    assert res.returncode == 1 and "not valid YAML" in res.stderr
    bad.write_text("kind: Pod\nmetadata:\n  name: p\n  annotations:\n"
                   "    traffic.sidecar.istio.io/includeInboundPorts: http\n"
                   "spec:\n  containers: [{name: a, image: a}]\n", encoding="utf-8")
    res = _run("-f", str(bad))
    assert res.returncode == 1 and "includeInboundPorts" in res.stderr and "'http' is not a port" in res.stderr
    bad.write_text("- just\n- a list\n", encoding="utf-8")
    res = _run("-f", str(bad))
    assert res.returncode == 1 and "not a Kubernetes object" in res.stderr
