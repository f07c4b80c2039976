"""``x-request-id`` values (``connection_manager.RequestIds``): UUIDv4-shaped, the counter's
twelve hex digits right across the 65,536-id boundary where the upper digits are renewed
(issue 11, `sat`: the last four digits come from a table) and across the 48-bit wrap."""

from __future__ import annotations

import random
import re

from diktyo.proxy.http.connection_manager import RequestIds

UUID4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


def counter(rid: str) -> int:
    return int(rid[-12:], 16)


def test_ids_are_uuid4_shaped_and_count_up() -> None:
    ids = RequestIds(random.Random(7))
    got = [ids.next() for _ in range(300)]
    assert all(UUID4.fullmatch(g) for g in got)
    assert len(set(got)) == 300
    first = counter(got[0])
    assert [counter(g) for g in got] == [(first + i) & 0xFFFFFFFFFFFF for i in range(300)]
    assert {g[:24] for g in got} == {ids.prefix}


def test_across_the_upper_digit_boundary_and_the_wrap() -> None:
    for start in (0x1234FFF0, 0xFFFFFFFFFFF0):
        rng = random.Random(start)
        ids = RequestIds(rng)
        # the same counter as a fresh generator whose rng drew ``start`` - 1
        ids.n = start - 1
        ids.mid = ids.prefix + f"{(start - 1) >> 16:08x}"
        got = [ids.next() for _ in range(40)]
        assert [counter(g) for g in got] == [(start + i) & 0xFFFFFFFFFFFF for i in range(40)]
        assert all(UUID4.fullmatch(g) for g in got)
