"""``diktyo install``: the Kubernetes manifests for diktyo (control plane, injector, webhook, RBAC)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "install",
        help="render diktyo's Kubernetes manifests (control plane, sidecar injector, RBAC)",
        description=(
            "Render the objects of diktyo's Helm chart (deploy/helm/diktyo) from Python, with a "
            "freshly generated TLS certificate for the injection webhook, without helm: "
            "'diktyo install --dry-run | kubectl apply -f -'. Then label a namespace "
            "'kubectl label namespace default istio-injection=enabled' and restart its pods."
        ),
    )
    p.add_argument("--dry-run", action="store_true",
                   help="print the manifests (required: diktyo does not talk to a cluster itself)")
    p.add_argument("-n", "--namespace", default="diktyo-system",
                   help="namespace of the control plane (default diktyo-system)")
    p.add_argument("-f", "--values", action="append", default=[], metavar="FILE",
                   help="YAML file of chart values (like helm -f; repeatable, applied before --set)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a chart value, e.g. --set image.tag=0.2.0 (repeatable)")
    p.add_argument("--with-crds", action="store_true",
                   help="also print the Istio CRDs (deploy/crds/istio-crds.yaml) first")
    p.add_argument("--crds", metavar="FILE", help="CRD file for --with-crds (default: the repository's)")
    p.set_defaults(func=run)


def _default_crds() -> Path:
    return Path(__file__).resolve().parents[3] / "deploy" / "crds" / "istio-crds.yaml"


def run(args: argparse.Namespace) -> int:
    from ruamel.yaml.error import YAMLError

    from diktyo.control.inject.install import (
        DEFAULT_VALUES,
        merge_values,
        namespace_object,
        render,
        values_with,
        with_webhook_certs,
    )
    from diktyo.control.inject.manifest import dump_docs, load_docs

    if not args.dry_run:
        print("diktyo install: diktyo does not talk to a cluster itself; run\n"
              "  diktyo install --dry-run | kubectl apply -f -\n"
              "or install the chart: helm install diktyo deploy/helm/diktyo -n diktyo-system "
              "--create-namespace --set-file ... (see docs/kubernetes.md)", file=sys.stderr)
        return 2
    try:
        values = DEFAULT_VALUES
        for path in args.values:
            try:
                docs = load_docs(Path(path).read_text(encoding="utf-8"))
            except OSError as exc:
                raise ValueError(f"cannot read values file {path}: {exc.strerror or exc}") from None
            except YAMLError as exc:
                raise ValueError(f"values file {path} is not valid YAML: {exc}") from None
            except ValueError as exc:  # ParseLimitError: a YAML bomb, deep nesting, too large
                where = f"{path}:{getattr(exc, 'line', 0)}:{getattr(exc, 'col', 0)}"
                raise ValueError(f"values file {where}: {exc}") from None
            values = merge_values(values, docs[0] if docs else {})
        values = values_with(args.set, values)
    except ValueError as exc:
        print(f"diktyo install: {exc}", file=sys.stderr)
        return 2
    out = []
    if args.with_crds:
        crds = Path(args.crds) if args.crds else _default_crds()
        if not crds.is_file():
            print(f"diktyo install: CRD file {crds} not found; pass --crds FILE "
                  "(deploy/crds/istio-crds.yaml in the diktyo repository)", file=sys.stderr)
            return 1
        out.append(crds.read_text(encoding="utf-8").rstrip("\n") + "\n")
    values = with_webhook_certs(values, args.namespace)
    docs = [namespace_object(args.namespace), *render(values, args.namespace)]
    out.append(dump_docs(docs) if not out else "---\n" + dump_docs(docs))
    sys.stdout.write("".join(out))
    return 0
