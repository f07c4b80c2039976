"""Docs name only files that exist (issue 13).

Checked: every relative Markdown link in README.md and docs/, every path written in code
spans there that starts at a top-level entry of the repository (``src/...``, ``docs/...``,
``samples/...``) or climbs out with ``../``, every module path written in code spans relative
to the package (``proxy/sidecar.py``, ``serve/push.py``: it must exist under ``src/diktyo/`` or
one of its packages), every ``src/``, ``tests/``, ``docs/``, ``bench/`` or ``samples/`` path
written anywhere, in prose or in a diagram (a glob must match a file), and every ``docs/*.md``
or ``notes/*.md`` named in Python sources. A path must exist and stay inside the repository (the CI clone has nothing
else). Placeholders (``deploy/NAME``, ``<dir>``, globs, ``{a,b}``) are not paths.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SOURCES = [
    p for d in ("src", "bench", "scripts", "tests") for p in sorted((ROOT / d).rglob("*.py"))
]
TOP_LEVEL = {p.name for p in ROOT.iterdir() if p.name not in (".git", ".venv")}

LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
DOC_IN_SOURCE = re.compile(r"\b((?:docs|notes)/[\w./-]+\.md)\b")
PLACEHOLDER = re.compile(r"[<>*{}$|?=\s]|(?:^|/)[A-Z][A-Z_]+(?:/|$)")
PACKAGE = ROOT / "src" / "diktyo"
# where a module path written relative to the package may start: the package, or any of its
# packages (``http/context.py`` in the sidecar's section means ``proxy/http/context.py``)
PACKAGE_DIRS = [PACKAGE, *sorted(p for p in PACKAGE.rglob("*") if (p / "__init__.py").is_file())]
PACKAGE_NAMES = {p.name for p in PACKAGE_DIRS[1:]}
# a repository path anywhere in the text (prose, tables, diagrams), up to its last word char
BARE = re.compile(r"(?<![\w./-])((?:src|tests|docs|bench|samples)/[\w./*-]*[\w/*])")


def _inside(path: Path) -> bool:
    return path == ROOT or ROOT in path.parents


def _existing(base: Path, target: str) -> bool:
    for start in (base, ROOT):
        p = (start / target).resolve()
        if _inside(p) and p.exists():
            return True
    return False


def _module_exists(token: str) -> bool:
    return any((base / token).exists() for base in PACKAGE_DIRS)


def _bare_exists(token: str) -> bool:
    if "*" in token:
        return next(ROOT.glob(token), None) is not None
    return (ROOT / token).exists()


def module_paths_named(doc: Path) -> list[tuple[int, str]]:
    """(line, path) of every package-relative module path in a code span (``proxy/x.py``)."""
    found: list[tuple[int, str]] = []
    for n, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
        for m in CODE_SPAN.finditer(line):
            token = m.group(1).strip().rstrip(".,:;")
            if PLACEHOLDER.search(token) or "/" not in token or "://" in token:
                continue
            first = token.split("/", 1)[0]
            if first in PACKAGE_NAMES and first not in TOP_LEVEL and token.endswith((".py", "/")):
                found.append((n, token))
    return found


def bare_paths_named(doc: Path) -> list[tuple[int, str]]:
    """(line, path) of every ``src/``, ``tests/``, ``docs/``, ``bench/``, ``samples/`` path
    written anywhere in ``doc``, fences and prose included."""
    return [
        (n, m.group(1))
        for n, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1)
        for m in BARE.finditer(line)
    ]


def paths_named(doc: Path) -> list[tuple[int, str]]:
    """(line, path) of every repository path ``doc`` links to or names in a code span."""
    found: list[tuple[int, str]] = []
    in_fence = False
    for n, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        for m in LINK.finditer(line):
            target = m.group(1).split("#", 1)[0]
            if target and not re.match(r"^[a-z][a-z0-9+.-]*:", target):
                found.append((n, target))
        for m in CODE_SPAN.finditer(line):
            token = m.group(1).strip().rstrip(".,:;")
            if PLACEHOLDER.search(token) or "/" not in token or "://" in token:
                continue
            first = token.split("/", 1)[0]
            if first in TOP_LEVEL or first == "..":
                found.append((n, token))
    return found


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_path_a_doc_names_exists(doc: Path) -> None:
    missing = [f"line {n}: {t}" for n, t in paths_named(doc) if not _existing(doc.parent, t)]
    assert not missing, f"{doc.relative_to(ROOT)} names files that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_module_a_doc_names_exists(doc: Path) -> None:
    missing = [f"line {n}: {t}" for n, t in module_paths_named(doc) if not _module_exists(t)]
    missing += [f"line {n}: {t}" for n, t in bare_paths_named(doc) if not _bare_exists(t)]
    assert not missing, f"{doc.relative_to(ROOT)} names files that do not exist: {missing}"


def test_sources_name_only_existing_docs() -> None:
    missing = [
        f"{p.relative_to(ROOT)}: {m.group(1)}"
        for p in SOURCES
        if p.name != "test_doc_links.py"
        for m in DOC_IN_SOURCE.finditer(p.read_text(encoding="utf-8"))
        if not (ROOT / m.group(1)).is_file()
    ]
    assert not missing, f"docs named in code that do not exist: {missing}"


def test_the_checker_sees_what_it_must(tmp_path: Path) -> None:
    doc = tmp_path / "x.md"
    doc.write_text(
        "See [the API](notes/UPSTREAM_API.md), `docs/dashboard.md` and `../shared/A.md`.\n"
        "Not paths: `deploy/NAME`, `src/diktyo/cli/{stat,load}.py`, [site](https://x.io/a.md).\n"
        "```\nsrc/in/a/fence.py\n```\n"
    )
    assert [t for _, t in paths_named(doc)] == [
        "notes/UPSTREAM_API.md",
        "docs/dashboard.md",
        "../shared/A.md",
    ]
    assert not _existing(ROOT, "../shared/A.md")  # outside the repository even if present
    assert _existing(ROOT / "docs", "../README.md")


def test_the_module_checker_sees_what_it_must(tmp_path: Path) -> None:
    doc = tmp_path / "x.md"
    doc.write_text(
        "The push server is `control/serve/push.py`, its routes `serve/config_api.py`, and\n"
        "`proxy/gone.py` is not there; nor is `control/serve/`'s twin `control/server/`.\n"
        "```\n  src/diktyo/control/server.py  -> tests/control/serve/test_x_*.py\n```\n"
        "Plain prose: src/diktyo/dashboard/mount.py and bench/results/*.nothing.\n"
    )
    named = module_paths_named(doc)
    assert [t for _, t in named] == [
        "control/serve/push.py",
        "serve/config_api.py",
        "proxy/gone.py",
        "control/serve/",
        "control/server/",
    ]
    assert [t for _, t in named if not _module_exists(t)] == ["proxy/gone.py", "control/server/"]
    bare = [t for _, t in bare_paths_named(doc)]
    assert bare == [
        "src/diktyo/control/server.py",
        "tests/control/serve/test_x_*.py",
        "src/diktyo/dashboard/mount.py",
        "bench/results/*.nothing",
    ]
    assert [t for t in bare if not _bare_exists(t)] == bare[1:]
