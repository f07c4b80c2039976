"""The ``diktyo`` command: one module per subcommand under ``diktyo.cli``.

Each module ``diktyo/cli/<name>.py`` that defines ``register(subparsers)`` adds its subcommand
(``register`` calls ``subparsers.add_parser`` and sets ``func`` with ``set_defaults``;
``func(args) -> int`` is the exit code).
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import diktyo
import diktyo.cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diktyo",
        description=(
            "diktyo: a service mesh in Python. Istio's YAML (VirtualService, DestinationRule, "
            "ServiceEntry, Gateway, ...), sidecars and a control plane, on one machine."
        ),
        epilog="Start with 'diktyo demo' for a whole Bookinfo mesh, or 'diktyo COMMAND --help'.",
    )
    parser.add_argument("--version", action="version", version=f"diktyo {diktyo.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in sorted(pkgutil.iter_modules(diktyo.cli.__path__), key=lambda m: m.name):
        if mod.name.startswith("_") or mod.name == "main":
            continue
        module = importlib.import_module(f"diktyo.cli.{mod.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
