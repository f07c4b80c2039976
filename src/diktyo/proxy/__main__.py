"""``python -m diktyo.proxy [flags]``: the sidecar without loading the rest of the CLI (lower RSS)."""

from __future__ import annotations

import argparse
import sys

from diktyo.cli.sidecar import DESCRIPTION, add_arguments, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diktyo.proxy", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
