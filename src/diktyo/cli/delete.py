"""``diktyo delete -f FILE|DIR``: remove resources applied with ``diktyo apply`` (like kubectl delete)."""

from __future__ import annotations

import argparse

from diktyo.cli._common import add_cp_arg, add_files_arg
from diktyo.cli.apply import add_wait_arg, send


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "delete",
        help="delete Istio resources from the running mesh",
        description="Delete the resources named (kind, namespace, name) in the given YAML from the control plane's applied config.",
    )
    add_files_arg(p, "YAML file or folder (repeatable)")
    add_cp_arg(p)
    add_wait_arg(p, "dropped")
    p.set_defaults(func=lambda a: send(a, "DELETE"))
