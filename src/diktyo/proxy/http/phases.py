"""The phases of a downstream stream, and the only transitions allowed between them.

A stream (one request/response exchange) moves forward only::

    DECODING ──> FORWARDING ──> RESPONDING ──> RESPONDED ──> DONE
        │             │              │              │          ▲
        │             └──────────────┴──────────────┴─> RESET ─┘
        ├──> RESPONDED (local reply: fault, 404, authz...)
        └──> RESET

- ``DECODING``: the request head is in; the decoder filters run (a filter may stop the chain:
  a fault delay, a JWKS fetch).
- ``FORWARDING``: the request goes upstream; upstream attempts (``UpstreamRequest``) come and
  go (retries, per-try timeouts) while no response byte went downstream.
- ``RESPONDING``: a response head went downstream; its body streams.
- ``RESPONDED``: the whole response went downstream (the request may still be arriving).
- ``RESET``: the exchange was aborted (the client went away, or a failure after the response
  started: the only honest answer is to reset the connection / stream; a route timeout that
  fires after the response but before the end of the request resets too).
- ``DONE``: stats, access log and trace are written; nothing may touch the stream any more.

The request side needs no phase of its own: it is a single flag (``req_done``), since request
data may arrive in any phase until DONE and is simply dropped once the response is complete.
"""

from __future__ import annotations

import enum


class Phase(enum.IntEnum):
    DECODING = 0
    FORWARDING = 1
    RESPONDING = 2
    RESPONDED = 3
    RESET = 4
    DONE = 5


class IllegalTransition(RuntimeError):
    """A stream was asked to move to a phase its current one cannot reach (a bug)."""

    def __init__(self, current: Phase, new: Phase) -> None:
        super().__init__(f"stream phase {current.name} -> {new.name} is not allowed")
        self.current = current
        self.new = new


DECODING = Phase.DECODING
FORWARDING = Phase.FORWARDING
RESPONDING = Phase.RESPONDING
RESPONDED = Phase.RESPONDED
RESET = Phase.RESET
DONE = Phase.DONE

# the transition table: phase -> the phases it may move to (always to a higher value)
TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    DECODING: frozenset({FORWARDING, RESPONDED, RESET}),
    FORWARDING: frozenset({RESPONDING, RESPONDED, RESET}),
    RESPONDING: frozenset({RESPONDED, RESET}),
    RESPONDED: frozenset({RESET, DONE}),
    RESET: frozenset({DONE}),
    DONE: frozenset(),
}
# indexed by the phase's int value: one tuple index and one set test per transition
_ALLOWED: tuple[frozenset[Phase], ...] = tuple(TRANSITIONS[p] for p in Phase)


def check_transition(current: Phase, new: Phase) -> Phase:
    """``new`` if ``current`` may move to it, else ``IllegalTransition``."""
    if new not in _ALLOWED[current]:
        raise IllegalTransition(current, new)
    return new
