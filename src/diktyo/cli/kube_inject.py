"""``diktyo kube-inject``: add the diktyo sidecar to Kubernetes manifests (like ``istioctl kube-inject``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "kube-inject",
        help="inject the diktyo sidecar into Kubernetes manifests (Deployments, Pods, ...)",
        description=(
            "Read Kubernetes YAML (one or more documents) and print it with the diktyo-proxy "
            "sidecar and the diktyo-init capture container added to every Pod and pod template "
            "(Deployment, StatefulSet, DaemonSet, ReplicaSet, Job, CronJob, List). Other objects "
            "pass through unchanged. Pods with sidecar.istio.io/inject: \"false\" are left alone. "
            "Example: diktyo kube-inject -f deployment.yaml | kubectl apply -f -"
        ),
    )
    p.add_argument("-f", "--filename", required=True, metavar="FILE",
                   help="manifest file to inject ('-' reads standard input)")
    p.add_argument("-o", "--output", metavar="FILE", help="write here instead of standard output")
    from diktyo.control.inject.webhook import add_config_arguments

    add_config_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ruamel.yaml.error import YAMLError

    from diktyo.control.inject.manifest import dump_docs, inject_manifest, load_docs
    from diktyo.control.inject.pod import InjectionError
    from diktyo.control.inject.webhook import config_from_args

    name = "standard input" if args.filename == "-" else args.filename
    try:
        text = sys.stdin.read() if args.filename == "-" else Path(args.filename).read_text(encoding="utf-8")
    except OSError as exc:
        print(f"diktyo kube-inject: cannot read {name}: {exc.strerror or exc}; "
              "give a manifest file with -f FILE (or -f - for standard input)", file=sys.stderr)
        return 1
    try:
        docs = load_docs(text)
    except ValueError as exc:  # ParseLimitError: a YAML bomb, deep nesting, too large
        print(f"diktyo kube-inject: {name}:{getattr(exc, 'line', 0)}:{getattr(exc, 'col', 0)}: "
              f"{exc}", file=sys.stderr)
        return 1
    except YAMLError as exc:
        print(f"diktyo kube-inject: {name} is not valid YAML: {exc}", file=sys.stderr)
        return 1
    bad = [i for i, d in enumerate(docs) if not isinstance(d, dict) or "kind" not in d]
    if bad:
        print(f"diktyo kube-inject: document {bad[0] + 1} of {name} is not a Kubernetes object "
              "(no 'kind'); give manifests like kubectl apply takes", file=sys.stderr)
        return 1
    try:
        out = dump_docs(inject_manifest(docs, config_from_args(args)))
    except InjectionError as exc:
        print(f"diktyo kube-inject: {name}: {exc}", file=sys.stderr)
        return 1
    if args.output:
        Path(args.output).write_text(out, encoding="utf-8")
    else:
        sys.stdout.write(out)
    return 0
