"""``python -m diktyo.proxy [flags]``: the sidecar without loading the rest of the CLI (lower RSS)."""

from __future__ import annotations

import argparse
import os
import sys

from diktyo.cli.sidecar import DESCRIPTION, add_arguments, run


def _formatter(prog: str) -> argparse.HelpFormatter:
    # an explicit width: argparse's default asks shutil for the terminal size, and shutil
    # (with bz2, lzma, fnmatch) would stay in the sidecar for good, ~0.5 MiB (issue 11)
    width = os.environ.get("COLUMNS", "")
    return argparse.HelpFormatter(prog, width=(int(width) if width.isdigit() else 80) - 2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m diktyo.proxy", description=DESCRIPTION, formatter_class=_formatter
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
