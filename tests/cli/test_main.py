"""The ``diktyo`` entry point: lazy command loading, its command table, quiet broken pipes."""

from __future__ import annotations

import argparse
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import diktyo.cli
from diktyo.cli.main import COMMANDS, build_parser, command_in, main, module_of

HEAVY = ("pydantic", "ruamel", "aiohttp", "cryptography", "uvloop", "google.protobuf")


def imported_after(argv: list[str]) -> set[str]:
    """Top-level packages of HEAVY that running ``diktyo ARGV`` imported (in a fresh process)."""
    code = (
        "import contextlib, io, sys\n"
        "from diktyo.cli.main import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        f"    main({argv!r})\n"
        f"print(' '.join(h for h in {HEAVY!r} if h in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    return set(out.stdout.split())


def test_every_command_module_is_in_the_table_with_its_own_summary() -> None:
    modules = {
        m.name
        for m in pkgutil.iter_modules(diktyo.cli.__path__)
        if not m.name.startswith("_") and m.name != "main"
    }
    assert {module_of(c).rsplit(".", 1)[1] for c in COMMANDS} == modules
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    registered = {a.dest: a.help for a in sub._choices_actions}
    assert registered == COMMANDS


def test_help_imports_no_command_module_and_nothing_heavy() -> None:
    assert imported_after(["--help"]) == set()
    assert imported_after(["status", "-o", "json"]) == set()
    assert imported_after(["status", "--help"]) == set()


def test_running_a_command_loads_only_that_command() -> None:
    code = (
        "import sys\nfrom diktyo.cli.main import build_parser\n"
        "build_parser(load=['status'])\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('diktyo.cli.'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert set(out.stdout.split()) == {"diktyo.cli._common", "diktyo.cli.main", "diktyo.cli.status"}


def test_command_in_argv() -> None:
    assert command_in(["status", "-o", "json"]) == "status"
    assert command_in(["--version"]) is None
    assert command_in(["-h", "proxy-config", "x"]) == "proxy-config"
    assert command_in(["nope"]) is None
    assert command_in(["--", "status"]) is None


def test_no_command_prints_help_and_unknown_command_is_an_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main([]) == 2
    assert "proxy-status" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["bogus"])
    assert exc.value.code == 2
    assert "invalid choice: 'bogus'" in capsys.readouterr().err


def test_subcommand_help_is_the_full_parser(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["status", "--help"])
    assert exc.value.code == 0
    assert "--output {table,json}" in capsys.readouterr().out


def test_output_into_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    """``diktyo status -o json | head``: the reader may be gone before diktyo writes."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # like `head` that has read its lines and exited
    env = {**os.environ, "HOME": str(tmp_path), "XDG_RUNTIME_DIR": str(tmp_path)}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "diktyo.cli.main", "status", "-o", "json"],
            stdout=write_end, stderr=subprocess.PIPE, env=env, timeout=60, check=False,
        )  # fmt: skip
    finally:
        os.close(write_end)
    assert proc.stderr == b""  # no BrokenPipeError traceback
    assert proc.returncode == 141  # 128 + SIGPIPE, as a shell reports `cat` cut short
