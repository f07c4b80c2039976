"""RE2 loads into a sidecar at the first request that needs a regex, not at start (issue 11,
idle RSS: ~2.4 MiB). A bad regex is still rejected when the config is accepted: the sidecar
validates a snapshot's regexes in a forked child (``diktyo.core.regex.check_all``) and
compiles each in its own process on first use.

Real sidecars (``diktyo sidecar``), real upstreams, a real (fake) control plane; the admin
``/memory`` endpoint says whether RE2 is loaded."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx

from diktyo.snapshot.codec import encode
from diktyo.testing import (
    FakeUpstream,
    RecordedRequest,
    Response,
    eventually,
    http_request,
    http_snapshot,
    static_service_entry,
)

VIRTUAL_SERVICE = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, namespace: default}}
spec:
  hosts: [reviews]
  http:
  - name: testers
    match:
    - headers:
        end-user: {{regex: "{regex}"}}
    route:
    - destination: {{host: ratings}}
  - route:
    - destination: {{host: reviews}}
"""


def _mesh(port: int, port2: int, regex: str) -> str:
    """reviews and ratings, and a VirtualService sending a regex-matched end-user to ratings."""
    return "---\n".join(
        [
            static_service_entry("reviews", port),
            static_service_entry("ratings", port2),
            VIRTUAL_SERVICE.format(regex=regex),
        ]
    )


def _diktyo_command() -> list[str]:
    exe = Path(sys.executable).parent / "diktyo"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "diktyo.cli.main"]


async def _optional_loaded(admin: int) -> list[str]:
    async with httpx.AsyncClient() as c:
        r = await c.get(f"http://127.0.0.1:{admin}/memory")
    assert r.status_code == 200, r.text
    loaded = r.json()["optional_modules_loaded"]
    assert isinstance(loaded, list)
    return loaded


def test_check_all_validates_in_a_child_and_compiles_on_first_use() -> None:
    """In a process without RE2: the verdicts (same messages as compiling) come from a forked
    child, are remembered, and the first match loads RE2 here; then validation is in-process."""
    script = textwrap.dedent(
        """
        import os, sys
        from diktyo.core import regex as R

        good, bad = R.LazyRegex("^(jason|ann)$"), R.LazyRegex("(?=x)")
        nocase = R.LazyRegex("ab+", ignore_case=True)
        verdicts = R.check_all([good, bad, nocase, R.LazyRegex("(?=x)")])
        assert "re2" not in sys.modules, "validation loaded RE2 into this process"
        assert verdicts[good.key] == "" and verdicts[nocase.key] == "", verdicts
        assert verdicts[bad.key] == "RE2 cannot compile '(?=x)': invalid perl operator: (?=", verdicts
        assert bad.error() == verdicts[bad.key] and good.error() == ""

        def no_fork():
            raise AssertionError("validated a known pattern again")

        real_fork, os.fork = os.fork, no_fork
        assert R.check_all([R.LazyRegex("^(jason|ann)$")]) == {good.key: ""}
        assert "re2" not in sys.modules
        assert good.fullmatch("ann") is not None and good.fullmatch("anna") is None
        assert nocase.fullmatch("ABB") is not None
        assert "re2" in sys.modules and good.loaded and not bad.loaded
        # RE2 loaded: new patterns are validated in this process (os.fork would raise)
        v = R.check_all([R.LazyRegex("([")])
        assert list(v.values())[0].startswith("RE2 cannot compile '(['"), v
        try:
            bad.fullmatch("x")
        except R.RegexError as exc:
            assert str(exc) == verdicts[bad.key]
        else:
            raise AssertionError("a bad pattern compiled")
        # no reference cycle, compiled or not: a replaced route table goes by refcount alone
        import gc, weakref
        gc.disable()
        for warm in (True, False):
            tmp = R.LazyRegex("x+")
            if warm:
                assert tmp.fullmatch("xx") is not None
            ref = weakref.ref(tmp)
            del tmp
            assert ref() is None, "a LazyRegex is in a reference cycle"
        print("ok")
        """
    )
    res = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


async def test_config_dir_sidecar_loads_re2_at_the_first_regex_route(tmp_path: Path) -> None:
    """The command the benchmark runs, with a header-regex route: RE2 is not loaded after
    start nor by requests that never reach the regex; the first that does is routed by it."""
    async with (
        FakeUpstream(Response(body=b"reviews")) as reviews,
        FakeUpstream(Response(body=b"ratings")) as ratings,
    ):
        (tmp_path / "mesh.yaml").write_text(
            _mesh(reviews.port, ratings.port, "^(jason|ann)$")
        )
        proc = await asyncio.create_subprocess_exec(
            *_diktyo_command(), "sidecar", "--config", str(tmp_path), "--outbound-port", "0",
            "--admin-port", "0", "--admin-token-file", str(tmp_path / "admin-token"),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            ready = json.loads(await asyncio.wait_for(proc.stdout.readline(), 60))
            port, admin = ready["listeners"]["outbound"], ready["admin"]
            assert "re2" not in await _optional_loaded(admin)
            r = await http_request(port, "GET", "http://reviews:9080/")  # no end-user header
            assert r.body == b"reviews"
            assert "re2" not in await _optional_loaded(admin)
            r = await http_request(port, "GET", "http://reviews:9080/", {"end-user": "jason"})
            assert r.body == b"ratings"  # the first regex evaluation: compiled now
            assert "re2" in await _optional_loaded(admin)
            r = await http_request(port, "GET", "http://reviews:9080/", {"end-user": "jasonx"})
            assert r.body == b"reviews"  # a full match, as Envoy's safe_regex
            r = await http_request(port, "GET", "http://reviews:9080/", {"end-user": "ann"})
            assert r.body == b"ratings"
        finally:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 15)


def test_bad_regex_is_still_rejected_when_the_sidecar_loads_its_config(tmp_path: Path) -> None:
    """``--config DIR``: the YAML error names file, line and column; ``--snapshot FILE`` (no
    translator in between): the sidecar's own validation rejects it before serving."""
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "mesh.yaml").write_text(_mesh(1, 2, "(?=x)"))
    res = subprocess.run(
        [*_diktyo_command(), "sidecar", "--config", str(tmp_path / "cfg")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert res.returncode == 1, res.stderr
    line = _mesh(1, 2, "(?=x)").splitlines().index('        end-user: {regex: "(?=x)"}') + 1
    assert f"{tmp_path / 'cfg' / 'mesh.yaml'}:{line}:" in res.stderr, res.stderr
    assert "invalid regex: RE2 cannot compile '(?=x)'" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr

    snap = http_snapshot(
        {"reviews": [("127.0.0.1", 1)]},
        routes={
            "reviews": [
                {
                    "name": "x",
                    "matches": [{"uri": {"kind": "regex", "value": "/api/(["}}],
                    "clusters": [{"cluster": "outbound|80||reviews"}],
                }
            ]
        },
    )
    (tmp_path / "snap.json").write_bytes(encode(snap))
    res = subprocess.run(
        [*_diktyo_command(), "sidecar", "--snapshot", str(tmp_path / "snap.json"),
         "--admin-port", "0"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert res.returncode == 1, res.stderr
    assert "invalid regex: RE2 cannot compile '/api/(['" in res.stderr, res.stderr
    assert '"event":"ready"' not in res.stdout.replace(" ", "")
    assert "Traceback" not in res.stderr


async def test_pushed_bad_regex_is_nacked_and_the_last_good_snapshot_serves() -> None:
    """Control-plane pushes: a snapshot with a bad regex is NACKed with RE2's reason, the
    previous one keeps serving, and RE2 is still not loaded (validated in a child); the good
    snapshot's regex route then works on its first use."""

    def routes(regex: str) -> dict[str, list[dict[str, object]]]:
        return {
            "reviews": [
                {
                    "name": "testers",
                    "matches": [
                        {
                            "headers": [
                                {"name": "end-user", "match": {"kind": "regex", "value": regex}}
                            ]
                        }
                    ],
                    "direct_response": {"status": 418, "body": "tester"},
                },
                {"name": "default", "clusters": [{"cluster": "outbound|80||reviews"}]},
            ]
        }

    async with FakeUpstream(Response(body=b"app")) as app:
        eps = {"reviews": [("127.0.0.1", app.port)]}
        good = encode(http_snapshot(eps, routes=routes("^(jason|ann)$"), version="cp-1"))
        bad = encode(http_snapshot(eps, routes=routes("(jason|ann"), version="cp-2"))

        def cp(req: RecordedRequest) -> Response:
            js = {"content-type": "application/json"}
            if req.path.startswith("/v1/snapshot"):
                if "version=cp-" not in req.path:
                    return Response(body=good, headers={**js, "x-diktyo-version": "cp-1"})
                if "version=cp-1" in req.path:
                    return Response(body=bad, headers={**js, "x-diktyo-version": "cp-2"})
                return Response(status=204, body=b"", delay=0.5)
            return Response(body=b"{}", headers=js)

        async with FakeUpstream(handler=cp) as plane:
            proc = await asyncio.create_subprocess_exec(
                *_diktyo_command(), "sidecar", "--control-plane", f"http://127.0.0.1:{plane.port}",
                "--node", "test.default", "--admin-port", "0",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
            try:
                assert proc.stdout is not None
                ready = json.loads(await asyncio.wait_for(proc.stdout.readline(), 60))
                assert ready["version"] == "cp-1"
                port, admin = ready["listeners"]["outbound"], ready["admin"]

                def nack() -> dict[str, object] | None:
                    for q in plane.requests:
                        if q.path == "/v1/ack":
                            ack = json.loads(q.body)
                            if ack["version"] == "cp-2":
                                return dict(ack)
                    return None

                ack = await eventually(nack, timeout=20, what="the sidecar's answer to cp-2")
                assert ack["ok"] is False
                assert "invalid regex: RE2 cannot compile '(jason|ann'" in str(ack["error"])
                assert "re2" not in await _optional_loaded(admin)
                r = await http_request(port, "GET", "http://reviews/")
                assert r.body == b"app"
                r = await http_request(port, "GET", "http://reviews/", {"end-user": "ann"})
                assert r.status == 418  # cp-1's regex route, compiled at this first use
                assert "re2" in await _optional_loaded(admin)
            finally:
                proc.terminate()
                await asyncio.wait_for(proc.wait(), 15)
