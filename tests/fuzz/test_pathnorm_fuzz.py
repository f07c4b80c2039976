"""Bounded Hypothesis fuzzing of path normalisation (what authorization policies match on).

Properties: a normalised path starts with "/", has no "." or ".." segment (encoded or not),
no "//" in the merging modes, no NUL; the query is returned untouched; normalising is
idempotent. Each would let a request past a path rule if it failed
(``/public/%2e%2e/admin`` must not stay outside ``/admin``).
"""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from diktyo.security.pathnorm import MODES, PathRejected, normalize_path

_pieces = st.sampled_from(
    ["a", "admin", ".", "..", "%2e", "%2E%2e", "%2f", "%5c", "\\", "/", "//", ";x=1", "%00",
     "%41", "%zz", "%", "caf\u00e9", "~", "%7e", "?", "#", "q=/../"]
)  # fmt: skip
paths = st.lists(_pieces, max_size=12).map(lambda p: "/" + "/".join(p))
modes = st.sampled_from([m for m in MODES if m != "NONE"])


@settings(max_examples=300, deadline=None)
@given(paths, modes)
@example("/public/%2e%2e/admin", "BASE")
@example("/a/%2E%2e/%2e/admin", "MERGE_SLASHES")
@example("/a%5c..%5cadmin", "DECODE_AND_MERGE_SLASHES")
@example("/..%2f..%2fadmin", "DECODE_AND_MERGE_SLASHES")
@example("/a/./b/../../../c?x=/../", "BASE")
def test_normalised_paths_have_no_dot_segments(target: str, mode: str) -> None:
    try:
        path, query = normalize_path(target, mode)  # type: ignore[arg-type]
    except PathRejected:
        return  # answered 400, never matched
    assert path.startswith("/")
    segments = path.split("/")
    for seg in segments:
        assert seg.lower() not in (".", "..", "%2e", "%2e%2e", ".%2e", "%2e.")
    if mode in ("MERGE_SLASHES", "DECODE_AND_MERGE_SLASHES"):
        assert "//" not in path
    if mode == "DECODE_AND_MERGE_SLASHES":
        assert "%2f" not in path.lower() and "%5c" not in path.lower()
    assert "\x00" not in path and "%00" not in path
    raw_query = target.split("#", 1)[0]
    assert query == (raw_query[raw_query.index("?") :] if "?" in raw_query else "")
    assert normalize_path(path + query, mode) == (path, query)  # type: ignore[arg-type]
