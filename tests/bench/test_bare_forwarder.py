"""``bench/bare.py``, the `bare` target (the floor of uvloop + httptools, issue 11): started as
``bench/run.py`` starts it, in front of the bench's nginx upstream, it forwards real requests
on one keep-alive connection, bodies included. No speed asserts."""

from __future__ import annotations

import http.client
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"

pytestmark = pytest.mark.skipif(
    any(shutil.which(t) is None for t in ("nginx", "taskset")),
    reason="needs nginx and taskset: apt-get install nginx util-linux",
)


@pytest.fixture
def bare_port() -> Iterator[int]:
    sys.path.insert(0, str(BENCH))
    try:
        import configs
        import procs
        import targets
    finally:
        sys.path.remove(str(BENCH))
    tmp = Path(tempfile.mkdtemp(prefix="diktyo-bare-test-"))
    upstream = targets.start_upstream(tmp, procs.LOAD_CORE)
    try:
        run = targets.start_target("bare", tmp, upstream)
        try:
            assert run.procs and run.procs[0].popen.poll() is None
            yield run.port
        finally:
            run.stop()
    finally:
        upstream.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    assert configs.SMALL_BODY == "ok\n"


@pytest.mark.timeout(60)
def test_bare_forwards_on_one_keep_alive_connection(bare_port: int) -> None:
    c = http.client.HTTPConnection("127.0.0.1", bare_port, timeout=10)
    c.request("GET", "/")
    r = c.getresponse()
    assert (r.status, r.read()) == (200, b"ok\n")
    sock = c.sock
    c.request("GET", "/1k")
    r = c.getresponse()
    body = r.read()
    assert r.status == 200 and len(body) == 1024 and body.startswith(b"0123456789abcdef")
    c.request("POST", "/", body=b"x" * 5000, headers={"Content-Type": "text/plain"})
    r = c.getresponse()
    assert (r.status, r.read()) == (200, b"ok\n")
    c.request("POST", "/", body=iter([b"abc", b"defg"]), encode_chunked=True)
    r = c.getresponse()
    assert (r.status, r.read()) == (200, b"ok\n")
    assert c.sock is sock  # every exchange on the first connection
    c.close()
