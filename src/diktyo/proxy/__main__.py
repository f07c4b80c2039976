"""``python -m diktyo.proxy [flags]``: the sidecar without loading the rest of the CLI (lower RSS)."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import argparse


from diktyo.proxy.memory import import_msgspec_lean  # noqa: E402 - light: os and sys only

import_msgspec_lean()  # before anything imports msgspec (issue 11: no typing_extensions)

from diktyo.cli.sidecar import ARGV_KEY, DESCRIPTION, PARSED_ARGS_ENV, add_arguments, run  # noqa: E402


def _formatter(prog: str) -> argparse.HelpFormatter:
    import argparse

    # an explicit width: argparse's default asks shutil for the terminal size, and shutil
    # (with bz2, lzma, fnmatch) would stay in the sidecar for good, ~0.5 MiB (issue 11)
    width = os.environ.get("COLUMNS", "")
    return argparse.HelpFormatter(prog, width=(int(width) if width.isdigit() else 80) - 2)


def _parsed_by_diktyo(argv: list[str]) -> argparse.Namespace | None:
    """The flags ``diktyo sidecar`` parsed before re-executing this (``$DIKTYO_SIDECAR_ARGS``,
    removed from the environment so that no child sees it), or None when there are none or
    they were parsed from another command line than ``argv``."""
    packed = os.environ.pop(PARSED_ARGS_ENV, "")
    if not packed:
        return None
    import json
    from types import SimpleNamespace
    from typing import cast

    try:
        parsed = json.loads(packed)
    except ValueError:
        return None
    if not isinstance(parsed, dict) or parsed.pop(ARGV_KEY, None) != argv:
        return None
    return cast("argparse.Namespace", SimpleNamespace(**parsed))  # run() reads attributes only


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        args = _parsed_by_diktyo(sys.argv[1:])
        if args is not None:
            return run(args)
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m diktyo.proxy", description=DESCRIPTION, formatter_class=_formatter
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
