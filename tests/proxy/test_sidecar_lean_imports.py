"""A standalone sidecar (``--config DIR``) runs without the YAML loader, pydantic, ruamel,
aiohttp or the control plane's translator in its process: the translation runs in a child
process that hands over the snapshot (issue 11, memory). RE2 loads only for a config with a
regex in it."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
from pathlib import Path

from diktyo.testing import FakeUpstream, http_request

MESH = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: reviews, namespace: default}}
spec:
  hosts: [reviews]
  ports: [{{number: 9080, name: http, protocol: HTTP}}]
  resolution: STATIC
  location: MESH_INTERNAL
  endpoints:
  - {{address: 127.0.0.1, ports: {{http: {port}}}}}
"""

# runs ``python -m diktyo.proxy ARGS`` in this interpreter; when the sidecar prints its ready
# line, the heavy modules it has loaded go to stderr as one JSON line
WRAPPER = textwrap.dedent(
    """
    import json, runpy, sys

    HEAVY = ("pydantic", "pydantic_core", "ruamel", "aiohttp", "yarl", "jsonschema", "re2",
             "diktyo.api", "diktyo.control", "diktyo.dashboard")

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
        (tmp_path / "mesh.yaml").write_text(MESH.format(port=app.port))
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
