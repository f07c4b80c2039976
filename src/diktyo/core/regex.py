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
