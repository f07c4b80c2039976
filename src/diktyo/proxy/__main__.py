"""``python -m diktyo.proxy [flags]``: the sidecar without loading the rest of the CLI (lower RSS)."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import argparse


def _import_msgspec_without_typing_extensions() -> None:
    """msgspec takes ``get_type_hints`` (and ``Required``/``NotRequired``) from
    typing_extensions when it is installed, as it is beside pydantic; Python 3.11's ``typing``
    has all that the snapshot model's annotations use, and an idle sidecar saves the 0.3 MiB
    typing_extensions holds (issue 11). A ``None`` entry in ``sys.modules`` makes msgspec's
    guarded import fail over to ``typing``; removed right after, so any later import of
    typing_extensions in this process works as usual."""
    if "msgspec" in sys.modules or "typing_extensions" in sys.modules:
        return
    sys.modules["typing_extensions"] = None  # type: ignore[assignment]  # None in sys.modules makes the import fail, by design
    try:
        import msgspec  # noqa: F401
    finally:
        del sys.modules["typing_extensions"]


_import_msgspec_without_typing_extensions()

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
