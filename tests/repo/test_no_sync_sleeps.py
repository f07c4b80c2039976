"""No sleep in tests/ used as synchronization (issue 13).

A test that waits for something to become true (a process up, a log line, a metric, a pushed
config) polls it with ``diktyo.testing.wait.eventually`` / ``eventually_sync``, which fail with
a message naming what was awaited. A ``time.sleep(...)`` or ``asyncio.sleep(...)`` call in
tests/ is allowed only when real time is what the test is about (a timeout or grace period
being exercised, an idle period proving nothing happens, a rate, a fake upstream's or load
generator's pause) and then says so on the call's line::

    await asyncio.sleep(0.5)  # real time: several failed reconnects while the plane is down

Rules, checked on the AST (sleeps inside strings, e.g. a child's ``-c`` program, don't count):

- every ``time.sleep`` / ``asyncio.sleep`` call in tests/ carries ``# real time: <reason>``
  on its first line;
- a sleep whose duration is a parameter (``asyncio.sleep(self.delay)``, ``reply.delay``) is a
  fake server's delay knob and is allowed without a comment: the test that sets the knob is
  the one about real time;
- the helpers in ``src/diktyo/testing`` are not scanned (``eventually`` itself sleeps between
  polls);
- the synchronization sleeps not yet converted when this check came in are counted per file
  in ``BASELINE``; a file may lose some, never gain (lower the count when you convert one).
"""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
MARK = "# real time:"

# file -> synchronization sleeps (poll loops and fixed waits) not yet turned into eventually():
# none left (issue 13); a new one is a failure, not an entry here
BASELINE: dict[str, int] = {}


def _is_sleep(node: ast.Call) -> bool:
    f = node.func
    return (
        isinstance(f, ast.Attribute)
        and f.attr == "sleep"
        and isinstance(f.value, ast.Name)
        and f.value.id in {"time", "asyncio"}
    )


def _is_delay_knob(node: ast.Call) -> bool:
    """``sleep(self.delay)`` / ``sleep(reply.delay)`` / ``sleep(delay)``: a parameter's value."""
    if len(node.args) != 1:
        return False
    arg = node.args[0]
    if isinstance(arg, ast.Attribute):
        name = arg.attr
    elif isinstance(arg, ast.Name):
        name = arg.id
    else:
        return False
    return "delay" in name


def unexplained_sleeps() -> Counter[str]:
    found: Counter[str] = Counter()
    for path in sorted(TESTS.rglob("*.py")):
        text = path.read_text()
        if "sleep(" not in text:
            continue
        lines = text.splitlines()
        for node in ast.walk(ast.parse(text, str(path))):
            if (
                isinstance(node, ast.Call)
                and _is_sleep(node)
                and not _is_delay_knob(node)
                and MARK not in lines[node.lineno - 1]
            ):
                found[path.relative_to(TESTS).as_posix()] += 1
    return found


def test_every_sleep_is_real_time_or_counted() -> None:
    found = unexplained_sleeps()
    over = {f: (n, BASELINE.get(f, 0)) for f, n in found.items() if n > BASELINE.get(f, 0)}
    assert not over, (
        "sleeps used as synchronization (file: (now, allowed)); wait with "
        "diktyo.testing.wait.eventually(condition, timeout=...) instead, or, if real time is "
        f"what the test is about, say why on the line with '{MARK} <reason>': {over}"
    )


def test_baseline_only_shrinks() -> None:
    """A file that lost sleeps lowers its count, so none can come back unnoticed."""
    found = unexplained_sleeps()
    stale = {f: (found.get(f, 0), n) for f, n in BASELINE.items() if found.get(f, 0) < n}
    assert not stale, f"lower these counts in BASELINE (file: (now, listed)): {stale}"
