"""A standalone sidecar (``--config DIR``) runs without the YAML loader, pydantic, ruamel,
aiohttp or the control plane's translator in its process: the translation runs in a child
process that hands over the snapshot (issue 11, memory). RE2 loads only for a config with a
regex in it, ``h2`` only on the first HTTP/2 connection (the admin ``/memory`` report says
which optional libraries are loaded)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest

from diktyo.testing import FakeUpstream, http_request, static_service_entry

# runs ``python -m diktyo.proxy ARGS`` in this interpreter; when the sidecar prints its ready
# line, the heavy modules it has loaded go to stderr as one JSON line
WRAPPER = textwrap.dedent(
    """
    import json, runpy, sys

    HEAVY = ("pydantic", "pydantic_core", "ruamel", "aiohttp", "yarl", "jsonschema", "re2",
             "h2", "hpack", "hyperframe", "shutil", "pathlib", "diktyo.api", "diktyo.control",
             "diktyo.dashboard")

    class Out:
        def __init__(self, real):
            self.real = real
        def write(self, s):
            n = self.real.write(s)
            if '"event":"ready"' in s.replace(" ", ""):
                self.real.flush()
                loaded = sorted(m for m in sys.modules if m.split(".")[0] in HEAVY
                                or ".".join(m.split(".")[:2]) in HEAVY)
                print(json.dumps({"heavy": loaded}), file=sys.stderr, flush=True)
            return n
        def flush(self):
            self.real.flush()
        def __getattr__(self, name):
            return getattr(self.real, name)

    sys.stdout = Out(sys.stdout)
    sys.argv = ["diktyo.proxy", *sys.argv[1:]]
    runpy.run_module("diktyo.proxy", run_name="__main__")
    """
)


async def test_config_dir_sidecar_loads_no_pydantic_ruamel_or_translator(tmp_path: Path) -> None:
    async with FakeUpstream() as app:
        (tmp_path / "mesh.yaml").write_text(static_service_entry("reviews", app.port))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", WRAPPER, "--config", str(tmp_path), "--outbound-port", "0",
            "--admin-port", "0", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            assert proc.stdout is not None and proc.stderr is not None
            ready = json.loads(await asyncio.wait_for(proc.stdout.readline(), 60))
            report = b""
            while not report.startswith(b'{"heavy"'):
                report = await asyncio.wait_for(proc.stderr.readline(), 30)
                assert report, "the sidecar exited before reporting its modules"
            assert json.loads(report)["heavy"] == []
            # and it serves the translated config
            r = await http_request(ready["listeners"]["outbound"], "GET", "http://reviews:9080/")
            assert r.status == 200
        finally:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 15)


def test_config_dir_errors_still_name_file_line_and_column(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\n"
        "metadata: {name: r, namespace: default}\nspec:\n  hosts: [r]\n  http:\n"
        "  - route:\n    - destination: {host: r}\n      weight: lots\n"
    )
    res = subprocess.run(
        [sys.executable, "-m", "diktyo.cli.main", "sidecar", "--config", str(tmp_path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert res.returncode == 1, res.stderr
    assert f"{tmp_path / 'bad.yaml'}:9:" in res.stderr and "weight" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


def _diktyo_command() -> list[str]:
    exe = Path(sys.executable).parent / "diktyo"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "diktyo.cli.main"]


async def _admin_memory(admin: int) -> dict[str, object]:
    async with httpx.AsyncClient() as c:
        r = await c.get(f"http://127.0.0.1:{admin}/memory")
    assert r.status_code == 200, r.text
    out = r.json()
    assert isinstance(out, dict)
    return out


async def test_diktyo_sidecar_loads_h2_only_for_the_first_http2_connection(
    tmp_path: Path,
) -> None:
    """``diktyo sidecar --config DIR`` (the command, as the benchmark runs it): serving
    HTTP/1.1, its admin ``/memory`` lists no optional library; the first h2c (prior knowledge)
    connection loads ``h2`` and is served."""
    async with FakeUpstream() as app:
        (tmp_path / "mesh.yaml").write_text(static_service_entry("reviews", app.port))
        proc = await asyncio.create_subprocess_exec(
            *_diktyo_command(), "sidecar", "--config", str(tmp_path), "--outbound-port", "0",
            "--admin-port", "0", "--admin-token-file", str(tmp_path / "admin-token"),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            ready = json.loads(await asyncio.wait_for(proc.stdout.readline(), 60))
            port, admin = ready["listeners"]["outbound"], ready["admin"]
            r = await http_request(port, "GET", "http://reviews:9080/")
            assert r.status == 200
            mem = await _admin_memory(admin)
            assert mem["optional_modules_loaded"] == []
            assert isinstance(mem["rss_bytes"], int) and mem["rss_bytes"] > 0
            assert (
                isinstance(mem["peak_rss_bytes"], int) and mem["peak_rss_bytes"] >= mem["rss_bytes"]
            )
            async with httpx.AsyncClient(http1=False, http2=True) as c:  # h2c prior knowledge
                h2r = await c.get(f"http://127.0.0.1:{port}/", headers={"host": "reviews:9080"})
            assert h2r.status_code == 200 and h2r.http_version == "HTTP/2"
            loaded = (await _admin_memory(admin))["optional_modules_loaded"]
            # the HTTP/2 codec in use: libnghttp2 through cffi (the compiled extension needs
            # only cffi's C backend; ABI mode imports cffi), or the h2 library as fallback
            assert isinstance(loaded, list)
            assert "_cffi_backend" in loaded or {"h2", "hpack", "hyperframe"} <= set(loaded), loaded
        finally:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 15)


async def test_idle_diktyo_sidecar_has_none_of_the_lazy_stdlib_modules(tmp_path: Path) -> None:
    """``diktyo sidecar --config DIR`` hands its parsed flags to the re-executed process (no
    argparse there) and loads neither ctypes (workers), hashlib, ipaddress nor the idna codec
    while idle (issue 11, idle RSS); the flags still apply (--header-timeout: a stalled head
    gets its 408 after 1 s, not the default 30)."""
    async with FakeUpstream() as app:
        (tmp_path / "mesh.yaml").write_text(static_service_entry("reviews", app.port))
        proc = await asyncio.create_subprocess_exec(
            *_diktyo_command(), "sidecar", "--config", str(tmp_path), "--outbound-port", "0",
            "--admin-port", "0", "--admin-token-file", str(tmp_path / "admin-token"),
            "--header-timeout", "1",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            ready = json.loads(await asyncio.wait_for(proc.stdout.readline(), 60))
            port, admin = ready["listeners"]["outbound"], ready["admin"]
            r = await http_request(port, "GET", "http://reviews:9080/")
            assert r.status == 200
            mem = await _admin_memory(admin)
            assert mem["lazy_stdlib_loaded"] == [] and mem["optional_modules_loaded"] == [], mem
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\nHost: reviews:9080\r\n")  # never finished
            await writer.drain()
            head = await asyncio.wait_for(reader.readline(), 10)  # default timeout: 30 s
            assert head.startswith(b"HTTP/1.1 408"), head
            writer.close()
        finally:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 15)


def test_parsed_flags_apply_only_to_the_command_line_they_came_from(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``$DIKTYO_SIDECAR_ARGS`` (set by ``diktyo sidecar`` just before it re-executes) is
    used for that argv only, and removed so that the sidecar's children never see it."""
    import os

    from diktyo.cli.sidecar import PARSED_ARGS_ENV
    from diktyo.proxy.__main__ import _parsed_by_diktyo

    argv = ["--snapshot", "s.json"]
    packed = json.dumps({"snapshot": "s.json", "header_timeout": 2.5, "__argv__": argv})
    monkeypatch.setenv(PARSED_ARGS_ENV, packed)
    args = _parsed_by_diktyo(["--snapshot", "s.json"])
    assert args is not None and args.snapshot == "s.json" and args.header_timeout == 2.5
    assert not hasattr(args, "__argv__")
    assert PARSED_ARGS_ENV not in os.environ
    monkeypatch.setenv(PARSED_ARGS_ENV, packed)
    assert _parsed_by_diktyo(["--snapshot", "other.json"]) is None  # parse argv instead
    assert PARSED_ARGS_ENV not in os.environ
    assert _parsed_by_diktyo(["--snapshot", "s.json"]) is None  # nothing set


def test_build_record_hashes_sources_without_openssl(tmp_path: Path) -> None:
    """A sidecar whose hot-path sources' mtimes differ from its build record (an installed
    wheel) hashes them at every start: with CPython's own SHA-256, not hashlib's OpenSSL
    (which stayed loaded: +0.55 MiB idle RSS); the digest is the same."""
    src = tmp_path / "m.py"
    src.write_bytes(b"x = 1\n" * 1000)
    script = (
        "import sys; from diktyo import _build; "
        f"rec = _build.file_record({str(src)!r}); "
        "assert '_hashlib' not in sys.modules and 'hashlib' not in sys.modules, 'hashlib loaded'; "
        "import hashlib; "
        f"assert rec['sha256'] == hashlib.sha256(open({str(src)!r}, 'rb').read()).hexdigest(); "
        "print('ok')"
    )
    res = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
