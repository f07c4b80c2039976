"""Bounded config parsing: YAML bombs, deep nesting, node counts and sizes are refused with a position."""

from __future__ import annotations

import itertools
import tracemalloc
from pathlib import Path

import pytest

from diktyo.api import load_paths, load_text
from diktyo.api.limits import ParseLimitError, ParseLimits, check_json, check_yaml, decode_json

HEAD = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: x}\nspec:\n"


def billion_laughs() -> str:
    """The classic 'billion laughs' document (~10^9 nodes once expanded), under 1 KB."""
    lines = ['  a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    names = "abcdefghi"
    for prev, cur in itertools.pairwise(names):
        lines.append(f"  {cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    return HEAD + "\n".join(lines) + "\n"


def test_billion_laughs_is_refused_with_position_and_flat_memory() -> None:
    bomb = billion_laughs()
    assert len(bomb.encode()) < 901
    tracemalloc.start()
    try:
        result = load_text(bomb, "bomb.yaml")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.resources == []
    [err] = result.errors
    text = str(err)
    # the first alias that takes the expansion over the limit, on the "f:" line (line 10)
    assert text.startswith("bomb.yaml:10:"), text
    assert "max_alias_nodes=100000" in text and "billion laughs" in text
    assert peak < 20 * 1024 * 1024  # nothing was expanded


def test_small_alias_use_still_loads() -> None:
    doc = HEAD + (
        "  hosts: [reviews]\n  http:\n  - route: &r\n    - destination: {host: reviews}\n"
        "    match: [{uri: {prefix: /a}}]\n  - route: *r\n"
    )
    result = load_text(doc, "ok.yaml")
    assert result.errors == [] and len(result.resources) == 1


@pytest.mark.parametrize(
    ("body", "line"),
    [
        ("  hosts: " + "[" * 5000 + "]" * 5000 + "\n", 5),
        ("  hosts: " + "{a: " * 3000 + "b" + "}" * 3000 + "\n", 5),
        ("  http:\n" + "".join("  " * (i + 2) + "k:\n" for i in range(400)) + "\n", 104),
        ("  http:\n  " + "- " * 3000 + "x\n", 6),
    ],
    ids=["flow-seq", "flow-map", "block-map", "compact-seq"],
)
def test_deep_nesting_is_an_error_with_position_not_recursion(body: str, line: int) -> None:
    result = load_text(HEAD + body, "deep.yaml")
    [err] = result.errors
    assert err.line == line and err.col > 1, str(err)
    assert "max_depth=100" in err.message


def test_node_count_limit_names_the_limit() -> None:
    limits = ParseLimits(max_nodes=50)
    text = "items:\n" + "".join(f"- {i}\n" for i in range(100))
    with pytest.raises(ParseLimitError) as info:
        check_yaml(text, limits, line_offset=10)
    assert info.value.limit == "max_nodes"
    # mapping, key, sequence, then the items: the 51st node is item 47 (line 49), +10 lines
    assert info.value.line == 59
    check_yaml(text, ParseLimits(max_nodes=200))


def test_alias_expansion_counts_nested_anchors() -> None:
    text = "a: &a [1, 2, 3, 4]\nb: &b [*a, *a, *a]\nc: [*b, *b]\n"
    # aliases add 4*3 (b) + 13*2 (c: each *b expands to itself + 3*(4+1)) nodes
    check_yaml(text, ParseLimits(max_alias_nodes=50))
    with pytest.raises(ParseLimitError) as info:
        check_yaml(text, ParseLimits(max_alias_nodes=20))
    assert (info.value.limit, info.value.line) == ("max_alias_nodes", 3)


def test_document_size_limit(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_text(HEAD + "#" + "x" * (16 * 1024 * 1024) + "\n")
    result = load_paths([tmp_path])
    [err] = result.errors
    assert str(err).startswith(f"{big}:1:1: error:") and "max_bytes" in err.message
    result = load_text(big.read_text(), "api")
    assert "max_bytes" in result.errors[0].message


def test_a_bomb_document_does_not_stop_its_neighbours() -> None:
    good = (
        HEAD.replace("name: x", "name: good")
        + "  hosts: [a]\n  http:\n  - route:\n    - destination: {host: a}\n"
    )
    result = load_text(good + "---\n" + billion_laughs(), "mixed.yaml")
    assert [r.name for r in result.resources] == ["good"]
    assert len(result.errors) == 1 and result.errors[0].line > 9


def test_json_depth_and_size() -> None:
    with pytest.raises(ParseLimitError) as info:
        check_json(b'{"a": "[[[[", "b":\n ' + b"[" * 200 + b"]" * 200 + b"}")
    assert (info.value.limit, info.value.line, info.value.col) == ("max_depth", 2, 101)
    # brackets inside strings do not count
    assert decode_json(b'{"a": "' + b"[" * 500 + b'"}') == {"a": "[" * 500}
    with pytest.raises(ParseLimitError):
        check_json(b"[" + b"1," * 100 + b"1]", ParseLimits(max_bytes=50))


@pytest.mark.timeout(60)
def test_megabytes_of_flow_brackets_are_refused_before_the_scanner() -> None:
    """ruamel's scanner spends ~0.1 ms per bracket before its first event: 2 million brackets
    would hold a worker for minutes; the bracket pre-scan refuses them at the 101st."""
    result = load_text(HEAD + "  hosts: " + "[" * 2_000_000 + "]" * 2_000_000 + "\n", "big.yaml")
    [err] = result.errors
    assert (err.line, err.col) == (5, 110) and "max_depth=100" in err.message
    # brackets in quotes and comments do not count
    quoted = HEAD + '  hosts: ["' + "[" * 300 + '"]  # ' + "{" * 300 + "\n"
    assert all("max_depth" not in e.message for e in load_text(quoted, "q.yaml").errors)
