"""RE2 for every regex a user supplies: linear-time matching, as Envoy's ``safe_regex``.

Python's ``re`` backtracks, so a pattern such as ``(a+)+$`` against a 41-byte value takes
minutes. RE2 (the ``google-re2`` package) runs in time linear in the input and rejects
constructs it cannot run that way (lookaround, backreferences, possessive quantifiers).

Semantics follow Envoy: a route / header / query / authority match is a *full* match
(``fullmatch``); the admin ``/stats?filter=`` is a *search*. Patterns over
``MAX_PROGRAM_SIZE`` are refused, as Istio's Envoy refuses them (Istio's bootstrap sets the
runtime key ``re2.max_program_size.error_level`` to 32768; plain Envoy's default is 100).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any

# Istio's ``re2.max_program_size.error_level`` (its proxy bootstrap's runtime layer).
MAX_PROGRAM_SIZE = 32768

Regex = Any  # re2._Regexp: fullmatch / search / match / sub, like ``re.Pattern``


class RegexError(ValueError):
    """A pattern RE2 cannot compile (or one too large); the message says why."""


def compile_re2(
    pattern: str, *, ignore_case: bool = False, max_program_size: int | None = None
) -> Regex:
    """Compile ``pattern`` with RE2; raise :class:`RegexError` with RE2's reason on failure.

    ``max_program_size`` (default :data:`MAX_PROGRAM_SIZE`; 0 for no limit) bounds the
    compiled program as Envoy does.
    """
    # imported on first use: a sidecar whose config has no regex never loads RE2 (~3 MB)
    import re2  # type: ignore[import-untyped]  # google-re2 ships no type stubs

    opts = re2.Options()
    opts.log_errors = False  # RE2 would otherwise print to stderr on every bad pattern
    if ignore_case:
        opts.case_sensitive = False
    try:
        rx = re2.compile(pattern, opts)
    except re2.error as exc:
        reason = exc.args[0] if exc.args else exc
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        raise RegexError(f"RE2 cannot compile {pattern!r}: {reason}") from None
    except (TypeError, ValueError) as exc:  # e.g. a NUL byte or bad text
        raise RegexError(f"RE2 cannot compile {pattern!r}: {exc}") from None
    limit = MAX_PROGRAM_SIZE if max_program_size is None else max_program_size
    if limit and rx.programsize > limit:
        raise RegexError(
            f"regex {pattern!r} is too complex: RE2 program size {rx.programsize} exceeds "
            f"{limit} (Istio's re2.max_program_size.error_level); simplify it"
        )
    return rx


def check_re2(pattern: str) -> str:
    """Validate ``pattern`` as RE2 would; return it unchanged or raise :class:`RegexError`."""
    compile_re2(pattern)
    return pattern


# --- compiled on first use, validated up front (issue 11, idle RSS) -----------------------
#
# RE2 (the extension, libre2 and libstdc++) costs a sidecar ~2.4 MiB of RSS for good once it is
# imported. A sidecar validates every regex of a snapshot when it accepts it (a bad one rejects
# the snapshot, the last good one keeps serving), but compiles each in its own process only
# when a request first needs it. The validation runs in a forked child that imports RE2,
# compiles the patterns and reports what it cannot compile; the sidecar itself does not load
# RE2 until a regex is used. Verdicts are remembered per (pattern, case, limit), so a push that
# repeats known patterns forks nothing; once RE2 is loaded, validation runs in-process.

RegexKey = tuple[str, bool, int]  # (pattern, ignore_case, max program size; 0 = no limit)

# key -> "" (RE2 compiles it) or the RegexError message; bounded (cleared when full)
_verdicts: dict[RegexKey, str] = {}
MAX_VERDICTS = 4096


class LazyRegex:
    """An RE2 pattern compiled on its first ``fullmatch`` / ``search`` / ``sub``.

    Once compiled, the compiled regex's own bound methods are set as instance attributes
    under those three names, so later calls skip this class (and no reference cycle is made:
    a replaced route table is freed by reference counting). Validate with :func:`check_all`
    (or :meth:`error`) before use: compiling a bad pattern here raises :class:`RegexError`
    at the first call.
    """

    def __init__(
        self, pattern: str, *, ignore_case: bool = False, max_program_size: int | None = None
    ) -> None:
        limit = MAX_PROGRAM_SIZE if max_program_size is None else max_program_size
        self.key: RegexKey = (pattern, ignore_case, limit)
        self._rx: Regex = None

    @property
    def pattern(self) -> str:
        return self.key[0]

    @property
    def loaded(self) -> bool:
        """Whether the pattern has been compiled in this process."""
        return self._rx is not None

    def compiled(self) -> Regex:
        """The compiled regex (compiling it now, loading RE2, if not yet)."""
        rx = self._rx
        if rx is None:
            pattern, ignore_case, limit = self.key
            rx = compile_re2(pattern, ignore_case=ignore_case, max_program_size=limit)
            self._rx = rx
            d = self.__dict__  # instance attributes win over these methods from now on
            d["fullmatch"], d["search"], d["sub"] = rx.fullmatch, rx.search, rx.sub
        return rx

    def error(self) -> str:
        """Why RE2 cannot compile the pattern, or "" when it can (validated, not compiled)."""
        return check_all([self]).get(self.key, "")

    def fullmatch(self, *args: Any) -> Any:
        return self.compiled().fullmatch(*args)

    def search(self, *args: Any) -> Any:
        return self.compiled().search(*args)

    def sub(self, *args: Any) -> Any:
        return self.compiled().sub(*args)

    def __repr__(self) -> str:
        return f"LazyRegex({self.key[0]!r}{', compiled' if self._rx is not None else ''})"


def _verdict(key: RegexKey) -> str:
    pattern, ignore_case, limit = key
    try:
        compile_re2(pattern, ignore_case=ignore_case, max_program_size=limit)
    except RegexError as exc:
        return str(exc)
    return ""


def _verdicts_in_child(keys: list[RegexKey]) -> list[str] | None:
    """The verdicts of ``keys`` from a forked child that imports RE2 (this process does not);
    None when that fails (no fork, the child died or said nothing readable)."""
    import json

    try:
        r, w = os.pipe()
    except OSError:
        return None
    try:
        pid = os.fork()
    except OSError:
        os.close(r)
        os.close(w)
        return None
    if pid == 0:  # the child: verdicts as one JSON list on the pipe, then exit at once
        code = 1
        try:
            os.close(r)
            view = memoryview(json.dumps([_verdict(k) for k in keys]).encode())
            while view:
                view = view[os.write(w, view) :]
            code = 0
        finally:
            os._exit(code)  # no atexit, no flushing of the parent's buffers
    os.close(w)
    chunks: list[bytes] = []
    try:
        while chunk := os.read(r, 65536):
            chunks.append(chunk)
    finally:
        os.close(r)
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:  # reaped by someone else: the output decides
            pass
    try:
        out = json.loads(b"".join(chunks))
    except ValueError:
        return None
    if not isinstance(out, list) or len(out) != len(keys):
        return None
    if not all(isinstance(v, str) for v in out):
        return None
    return out


def check_all(regexes: Iterable[LazyRegex]) -> dict[RegexKey, str]:
    """Validate every regex in ``regexes``: key -> "" (compiles) or why RE2 cannot compile it.

    Patterns seen before answer from memory; the others are compiled together, in this
    process if RE2 is already loaded, else in one forked child (in-process if forking fails).
    """
    out: dict[RegexKey, str] = {}
    todo: list[RegexKey] = []
    for rx in regexes:
        key = rx.key
        if key in out:
            continue
        known = _verdicts.get(key)
        if known is None:
            if key not in todo:
                todo.append(key)
        else:
            out[key] = known
    if todo:
        found: list[str] | None = None
        if "re2" not in sys.modules and hasattr(os, "fork"):
            found = _verdicts_in_child(todo)
        if found is None:
            found = [_verdict(k) for k in todo]
        if len(_verdicts) + len(todo) > MAX_VERDICTS:
            _verdicts.clear()
        for key, verdict in zip(todo, found, strict=True):
            _verdicts[key] = out[key] = verdict
    return out
