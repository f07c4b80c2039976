"""Request path normalisation before authorization and forwarding, as Envoy does for Istio.

Istio's ``meshConfig.pathNormalization`` picks one of four levels (default ``BASE``):

- ``NONE``: nothing but splitting off query and fragment.
- ``BASE`` (Istio's default; Envoy ``normalize_path``): percent-decoding of unreserved
  characters (``A-Z a-z 0-9 - . _ ~``), upper-case hex for the other escapes, ``\\`` -> ``/``,
  RFC 3986 dot-segment removal (``/a/../b`` -> ``/b``, also when written ``%2e%2e``).
- ``MERGE_SLASHES``: BASE, then ``//`` -> ``/``.
- ``DECODE_AND_MERGE_SLASHES``: first ``%2F``/``%5C`` are decoded to ``/``/``\\``, then
  MERGE_SLASHES. Istio recommends it when a DENY policy guards paths.

Always: ``%00`` (or a raw NUL / control character) is rejected (Envoy answers 400); a stray
``%`` not followed by two hex digits becomes ``%25``, so normalising twice changes nothing
(the function is idempotent); the fragment is dropped; the query is kept apart and not
touched. Matrix parameters (``;x``) are kept, as in Istio: prefer ALLOW policies, or
``notPaths``, if your application strips them.
"""

from __future__ import annotations

from typing import Literal

Mode = Literal["NONE", "BASE", "MERGE_SLASHES", "DECODE_AND_MERGE_SLASHES"]
MODES: tuple[Mode, ...] = ("NONE", "BASE", "MERGE_SLASHES", "DECODE_AND_MERGE_SLASHES")

_HEX = "0123456789abcdefABCDEF"
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# characters kept as they are in a path; everything else is percent-encoded
_PATH_SAFE = _UNRESERVED | frozenset("/!$&'()*+,;=:@%")


class PathRejected(ValueError):
    """A request path that must be answered with 400 (e.g. it contains ``%00``)."""


def _encode_char(ch: str) -> str:
    return "".join(f"%{b:02X}" for b in ch.encode("utf-8", "surrogatepass"))


def _percent_pass(path: str, decode_slashes: bool) -> str:
    """One left-to-right pass over escapes: decode unreserved (and slashes if asked)."""
    out: list[str] = []
    i = 0
    n = len(path)
    while i < n:
        ch = path[i]
        if ch == "%":
            if i + 2 < n and path[i + 1] in _HEX and path[i + 2] in _HEX:
                code = int(path[i + 1 : i + 3], 16)
                if code == 0:
                    raise PathRejected("path contains %00")
                dec = chr(code)
                if dec in _UNRESERVED or (decode_slashes and dec in "/\\"):
                    out.append(dec)
                else:
                    out.append("%" + path[i + 1 : i + 3].upper())
                i += 3
                continue
            out.append("%25")
            i += 1
            continue
        if ch == "\x00" or ord(ch) < 0x20 or ord(ch) == 0x7F:
            raise PathRejected(f"path contains control character {ch!r}")
        out.append(ch if ch in _PATH_SAFE or ch == "\\" else _encode_char(ch))
        i += 1
    return "".join(out)


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 section 5.2.4 for an absolute path."""
    segments = path.split("/")[1:]
    out: list[str] = []
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        if seg == ".":
            if last:
                out.append("")
            continue
        if seg == "..":
            if out:
                out.pop()
            if last:
                out.append("")
            continue
        out.append(seg)
    return "/" + "/".join(out)


def _merge_slashes(path: str) -> str:
    while "//" in path:
        path = path.replace("//", "/")
    return path


def split_target(target: str) -> tuple[str, str]:
    """``/p?q#f`` -> (``/p``, ``?q``); absolute-form ``http://h/p`` -> (``/p``, ...)."""
    hash_at = target.find("#")
    if hash_at >= 0:
        target = target[:hash_at]
    low = target[:8].lower()
    if low.startswith(("http://", "https://")):
        rest = target.split("://", 1)[1]
        slash = min((x for x in (rest.find("/"), rest.find("?")) if x >= 0), default=len(rest))
        target = rest[slash:]
    q = target.find("?")
    if q >= 0:
        return target[:q], target[q:]
    return target, ""


def normalize_path(target: str, mode: Mode = "BASE") -> tuple[str, str]:
    """Normalise a request target; returns ``(path, query)`` with ``query`` starting at ``?``.

    Raises ``PathRejected`` for paths Envoy would answer with 400.
    """
    path, query = split_target(target)
    if path == "*":
        return path, query
    if mode == "NONE":
        if "\x00" in path or "%00" in path:
            raise PathRejected("path contains %00")
        return path, query
    if not path.startswith("/"):
        path = "/" + path
    path = _percent_pass(path, decode_slashes=mode == "DECODE_AND_MERGE_SLASHES")
    path = path.replace("\\", "/")
    path = _remove_dot_segments(path)
    if mode in ("MERGE_SLASHES", "DECODE_AND_MERGE_SLASHES"):
        path = _merge_slashes(path)
    return path, query
