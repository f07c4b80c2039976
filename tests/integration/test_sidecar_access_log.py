"""Access logs never block the data plane: a sidecar whose stdout is never read keeps serving,
drops what its bounded buffer cannot hold, counts the drops and warns (rate-limited)."""

from __future__ import annotations

import asyncio
from pathlib import Path

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


async def test_stdout_and_stderr_on_one_unread_pipe_like_the_supervisor(tmp_path: Path) -> None:
    """The local platform gives a sidecar one pipe for stdout and stderr; the warning about
    dropped lines must not block on that full pipe either."""
    import json
    import sys

    from diktyo.snapshot.codec import encode

    async with FakeUpstream() as up:
        snap = http_snapshot(
            {"reviews": [("127.0.0.1", up.port)]},
            mesh={"access_log": {"enabled": True, "format": "json", "path": "/dev/stdout"}},
        )
        (tmp_path / "snap.json").write_bytes(encode(snap))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "diktyo.proxy", "--snapshot", str(tmp_path / "snap.json"),
            "--access-log-buffer-kb", "16", "--admin-token-file", str(tmp_path / "token"),
            "--log-level", "info",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            ready = None
            while ready is None:
                line = await asyncio.wait_for(proc.stdout.readline(), 30)
                assert line, "sidecar exited before ready"
                if line.startswith(b'{"event":"ready"'):
                    ready = json.loads(line)
            port = ready["listeners"]["outbound"]
            async with HttpClient(port, timeout=10) as c:
                for i in range(REQUESTS):
                    assert (await c.get(f"http://reviews/{i}?pad={'x' * 500}")).status == 200
            r = await http_request(ready["admin"], "GET", "/stats?filter=dropped", {"Host": "x"})
            assert r.status == 200 and "http.access_log_lines_dropped: " in r.text
            proc.terminate()  # SIGTERM drains and exits 0 even with the pipe full
            await asyncio.wait_for(proc.communicate(), 15)  # reads the pipe to EOF meanwhile
            assert proc.returncode == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await asyncio.wait_for(proc.communicate(), 5)
