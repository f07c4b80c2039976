"""``diktyo prometheus-config``: a Prometheus scrape config for the running mesh's sidecars.

Each sidecar (and gateway) replica serves Istio's metrics at
``http://127.0.0.1:<admin port>/stats/prometheus``; the replicas come from the control plane
(``/v1/workloads``) or, failing that, from the mesh's state file. Every target carries the
labels ``workload``, ``namespace``, ``pod`` and ``version`` like Istio's Kubernetes
relabelling does. The YAML itself is :func:`diktyo.telemetry.prometheus_config.scrape_config`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from diktyo.cli._common import add_cp_arg, call, cp_url
from diktyo.telemetry.prometheus_config import Target, scrape_config


def targets_of(replicas: Iterable[Mapping[str, Any]], host: str = "127.0.0.1") -> list[Target]:
    """One scrape target per replica with an admin port, labelled like Istio's pods."""
    out = []
    for r in replicas:
        port = r.get("admin_port")
        if not port:
            continue
        labels = {
            "workload": str(r.get("workload") or r.get("name") or "unknown"),
            "namespace": str(r.get("namespace") or "default"),
            "pod": str(r.get("name") or r.get("node") or "unknown"),
        }
        if r.get("version"):
            labels["version"] = str(r["version"])
        addr = str(r.get("address") or "")  # transparent mode: the replica's own address
        out.append(Target(f"{addr if addr and addr != '127.0.0.1' else host}:{int(port)}", labels))
    return sorted(out, key=lambda t: (t.labels.get("namespace", ""), t.labels.get("pod", "")))


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "prometheus-config",
        help="print a Prometheus scrape config for the mesh's sidecars",
        description=(
            "Print a prometheus.yml that scrapes Istio's metrics from every sidecar and gateway "
            "of the running mesh (admin port, /stats/prometheus). Run Prometheus with it, then "
            "point the dashboard at it: 'diktyo up -f mesh.yaml --prometheus http://127.0.0.1:9090'."
        ),
        epilog="Example: diktyo prometheus-config > prometheus.yml && prometheus "
        "--config.file=prometheus.yml",
    )
    p.add_argument(
        "--scrape-interval", default="15s", help="Prometheus scrape interval (default 15s)"
    )
    p.add_argument("--job-name", default="diktyo-sidecars", help="the scrape job's name")
    p.add_argument("--output-file", "-o", metavar="FILE", help="write to FILE instead of stdout")
    add_cp_arg(p)
    p.set_defaults(func=run)


def replicas_of_mesh(base: str) -> list[dict[str, Any]]:
    """Replicas from the control plane, else from the state file of the mesh 'diktyo up' runs."""
    status, body = call("GET", base + "/v1/workloads")
    if status == 200 and isinstance(body, dict) and body.get("workloads"):
        return list(body["workloads"])
    from diktyo.platform.state import running_state

    state = running_state()
    if state and str(state.get("control_plane", "")).rstrip("/") == base:
        return list(state.get("workloads", []))
    return []


def run(args: argparse.Namespace) -> int:
    base = cp_url(args)
    if base is None:
        return 1
    try:
        replicas = replicas_of_mesh(base)
    except ConnectionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    targets = targets_of(replicas)
    if not targets:
        print(
            f"error: the control plane at {base} knows no sidecar admin ports (no workloads "
            "started by 'diktyo up'); for sidecars started by hand use "
            "'python -m diktyo.telemetry.prometheus_config HOST:ADMIN_PORT ...'",
            file=sys.stderr,
        )
        return 1
    try:
        text = scrape_config(targets, args.scrape_interval, job_name=args.job_name)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.output_file:
        Path(args.output_file).write_text(text)
        print(f"wrote {args.output_file}: {len(targets)} targets", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
