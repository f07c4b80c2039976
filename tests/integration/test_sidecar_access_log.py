"""Access logs never block the data plane: a sidecar whose stdout is never read keeps serving,
drops what its bounded buffer cannot hold, counts the drops and warns (rate-limited)."""

from __future__ import annotations

import asyncio

from diktyo.testing import (
    FakeUpstream,
    HttpClient,
    http_request,
    http_snapshot,
    start_sidecar_process,
)

REQUESTS = 800  # ~600 KB of log lines: twice what the pipe, the reader's buffer (asyncio
# pauses reading at 128 KiB) and the sidecar's 16 KiB buffer hold


async def test_unread_stdout_does_not_stop_traffic() -> None:
    async with FakeUpstream() as up:
        snap = http_snapshot(
            {"reviews": [("127.0.0.1", up.port)]},
            mesh={"access_log": {"enabled": True, "format": "text", "path": "/dev/stdout"}},
        )
        # stdout is a pipe the helper reads only for the ready line: nobody reads the logs
        async with start_sidecar_process(snap, "--access-log-buffer-kb", "16") as sc:
            statuses = []
            async with HttpClient(sc.port(), timeout=10) as c:
                for i in range(REQUESTS):
                    statuses.append((await c.get(f"http://reviews/{i}?pad={'x' * 500}")).status)
            assert statuses == [200] * REQUESTS
            r = await http_request(sc.admin, "GET", "/stats?filter=access_log", {"Host": "x"})
            stats = dict(ln.split(": ") for ln in r.text.splitlines() if ln)
            dropped = int(stats.get("http.access_log_lines_dropped", 0))
            written = int(stats.get("http.access_log_lines_written", 0))
            assert dropped > 0 and written > 0, stats
            assert dropped + written == REQUESTS
            # the lines that were written are whole lines, in order, from the first request
            assert sc.process.stdout is not None
            first = await asyncio.wait_for(sc.process.stdout.readline(), 5)
            assert b'"GET /0?pad=' in first and first.endswith(b"\n")
