"""AccessLogWriter: bounded and non-blocking on a real pipe; whole lines, in order, or counted drops."""

from __future__ import annotations

import asyncio
import fcntl
import os

from diktyo.proxy.access_log import AccessLogWriter
from diktyo.testing import eventually


async def test_full_pipe_drops_lines_without_blocking_then_flushes_in_order() -> None:
    r, w = os.pipe()
    fcntl.fcntl(r, fcntl.F_SETFL, fcntl.fcntl(r, fcntl.F_GETFL) | os.O_NONBLOCK)
    path = f"/proc/self/fd/{w}"
    stats: dict[str, int] = {}
    writer = AccessLogWriter(asyncio.get_running_loop(), path, stats, max_buffer=4096)
    try:
        lines = [f"line {i:05d} {'x' * 90}\n" for i in range(2000)]  # ~200 KB > pipe + buffer
        for ln in lines:
            writer.write(ln)  # must return at once even though nobody reads
        assert stats["access_log_lines_dropped"] > 0
        assert stats["access_log_lines_written"] + stats["access_log_lines_dropped"] == 2000
        assert writer.buffered <= 4096
        # now a reader drains the pipe; the loop flushes the buffer as the fd becomes writable
        got = b""

        def drained() -> bool:
            nonlocal got
            try:
                while chunk := os.read(r, 65536):
                    got += chunk
            except BlockingIOError:
                pass
            return not writer.buf

        await eventually(drained, timeout=10, interval=0.01, what="the buffer flushed")
        try:
            got += os.read(r, 65536)
        except BlockingIOError:
            pass
        out = got.decode().splitlines(keepends=True)
        assert len(out) == stats["access_log_lines_written"]
        assert all(ln in lines for ln in out)  # whole lines only
        assert out == sorted(out)  # in order
        assert out[0] == lines[0]
    finally:
        writer.close()
        os.close(r)
        os.close(w)
