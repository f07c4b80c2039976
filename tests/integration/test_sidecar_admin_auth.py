"""State-changing sidecar admin endpoints need a bearer token; read-only ones stay open on
loopback. A real sidecar process, its token file and real HTTP."""

from __future__ import annotations

import asyncio
import os
import stat
import sys
from pathlib import Path

from diktyo.testing import FakeUpstream, http_request, http_snapshot, start_sidecar_process


async def test_quitquitquit_needs_the_token(tmp_path: Path) -> None:
    token_file = tmp_path / "admin-token"
    async with (
        FakeUpstream() as up,
        start_sidecar_process(
            http_snapshot({"reviews": [("127.0.0.1", up.port)]}),
            "--admin-token-file",
            str(token_file),
        ) as sc,
    ):
        # created with a fresh token, mode 0600, and named in the ready line
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = token_file.read_text().strip()
        assert len(token) >= 32
        assert sc.extra["admin_token_file"] == str(token_file)
        for path in ("/quitquitquit", "/drain", "/drain_listeners"):
            r = await http_request(sc.admin, "POST", path, {"Host": "x"})
            assert r.status == 401, path
            assert r.header("www-authenticate") is not None
            assert str(token_file) in r.text  # says where the token is
            r = await http_request(
                sc.admin, "POST", path, {"Host": "x", "Authorization": "Bearer nope"}
            )
            assert r.status == 401
        # read-only endpoints stay open on loopback
        for path in ("/ready", "/stats", "/stats/prometheus", "/config_dump", "/clusters"):
            r = await http_request(sc.admin, "GET", path, {"Host": "x"})
            assert r.status == 200, path
        # still serving after the refused attempts
        assert (await http_request(sc.port(), "GET", "http://reviews/")).status == 200
        assert sc.process.returncode is None
        # the right token stops it
        r = await http_request(
            sc.admin, "POST", "/quitquitquit", {"Host": "x", "Authorization": f"Bearer {token}"}
        )
        assert r.status == 200
        assert await asyncio.wait_for(sc.process.wait(), 15) == 0


async def test_existing_token_file_is_used_and_loose_modes_are_refused(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token-from-operator\n")
    token_file.chmod(0o644)
    snap = http_snapshot({"reviews": [("127.0.0.1", 1)]})
    snap_file = tmp_path / "snap.json"
    from diktyo.snapshot.codec import encode

    snap_file.write_bytes(encode(snap))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "diktyo.proxy", "--snapshot", str(snap_file),
        "--admin-token-file", str(token_file),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1
    assert b"chmod 600" in err and str(token_file).encode() in err
    token_file.chmod(0o600)
    async with start_sidecar_process(snap, "--admin-token-file", str(token_file)) as sc:
        assert sc.extra["admin_token"] == "s3cret-token-from-operator"
        r = await http_request(
            sc.admin,
            "POST",
            "/drain",
            {"Host": "x", "Authorization": "Bearer s3cret-token-from-operator"},
        )
        assert r.status == 200


async def test_default_token_is_generated_in_the_state_dir_and_removed(tmp_path: Path) -> None:
    snap = http_snapshot({"reviews": [("127.0.0.1", 1)]})
    snap_file = tmp_path / "snap.json"
    from diktyo.snapshot.codec import encode

    snap_file.write_bytes(encode(snap))
    env = {k: v for k, v in os.environ.items() if k != "DIKTYO_ADMIN_TOKEN_FILE"}
    env["DIKTYO_HOME"] = str(tmp_path / "home")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "diktyo.proxy", "--snapshot", str(snap_file),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        import json

        ready = json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))
        path = Path(ready["admin_token_file"])
        assert path == tmp_path / "home" / "sidecars" / str(proc.pid) / "admin-token"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        r = await http_request(
            ready["admin"],
            "POST",
            "/quitquitquit",
            {"Host": "x", "Authorization": f"Bearer {path.read_text().strip()}"},
        )
        assert r.status == 200
        assert await asyncio.wait_for(proc.wait(), 15) == 0
        assert not path.exists()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_unwritable_state_dir_still_starts_with_mutations_disabled(tmp_path: Path) -> None:
    import json

    from diktyo.snapshot.codec import encode

    snap_file = tmp_path / "snap.json"
    snap_file.write_bytes(encode(http_snapshot({"reviews": [("127.0.0.1", 1)]})))
    (tmp_path / "a-file").write_text("")
    env = {k: v for k, v in os.environ.items() if k != "DIKTYO_ADMIN_TOKEN_FILE"}
    env["DIKTYO_HOME"] = str(tmp_path / "a-file" / "home")  # cannot be created (even as root)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "diktyo.proxy", "--snapshot", str(snap_file),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        ready = json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))
        assert ready["admin_token_file"] is None
        r = await http_request(ready["admin"], "POST", "/quitquitquit", {"Host": "x"})
        assert r.status == 401
        assert (await http_request(ready["admin"], "GET", "/ready", {"Host": "x"})).status == 200
        proc.terminate()  # SIGTERM still drains
        assert await asyncio.wait_for(proc.wait(), 15) == 0
        assert proc.stderr is not None
        assert b"--admin-token-file" in await proc.stderr.read()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
