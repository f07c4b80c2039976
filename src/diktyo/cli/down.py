"""``diktyo down``: stop the running local mesh (apps, then sidecars, then the control plane)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "down",
        help="stop the running local mesh",
        description="Stop the mesh started by 'diktyo up' or 'diktyo demo': apps first, then sidecars, then the control plane.",
    )
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait (default 60)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from diktyo.platform.run import stop_running

    return stop_running(args.timeout)
