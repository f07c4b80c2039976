"""Idle RSS of a diktyo sidecar, A/B: start the bench's sidecar once per variant, alternated,
``--reps`` times, and print VmRSS ``--settle`` seconds after its ready line (issue 11: <= 30 MB).

The sidecar is the one ``bench/run.py`` measures (the bench mesh of ``configs.istio_yaml()``
in front of a running nginx upstream): ``--source snapshot`` runs it as ``bench/run.py``
does (``diktyo sidecar --snapshot FILE``, the YAML translated by diktyo's translator);
``--source config`` as a user does (``diktyo sidecar --config DIR``).

A variant is ``NAME`` or ``NAME:KEY=VALUE,KEY=VALUE``: environment settings for its
sidecars. ``PYTHONPATH=DIR`` runs another tree's diktyo (e.g. a copy of ``src/`` made before
an edit, with its compiled ``.so`` files) with this venv's dependencies::

    cp -a src /tmp/base-src   # before the edit
    .venv/bin/python bench/idlerss.py --variant base:PYTHONPATH=/tmp/base-src --variant new

Every variant's tree is byte-compiled first (stale ``.pyc`` files cost ~1.5 MiB).
It also prints the median time from spawning the sidecar to its ready line (``--source
snapshot`` includes translating the YAML in this process). ``--modules`` also prints, per variant, the optional packages the admin ``/memory``
endpoint reports loaded.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import configs  # noqa: E402
import targets as tg  # noqa: E402
from procs import PROXY_CORE, Proc, free_port, start_sidecar  # noqa: E402


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    name, _, rest = text.partition(":")
    env: dict[str, str] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"idlerss: variant {text!r}: {item!r} is not KEY=VALUE")
        env[key] = value
    return name, env


def byte_compile(env: dict[str, str]) -> None:
    root = env.get("PYTHONPATH")
    if root:
        compileall.compile_dir(os.path.join(root, "diktyo"), quiet=1, workers=1)
    else:
        import importlib.util

        spec = importlib.util.find_spec("diktyo")
        for d in (spec.submodule_search_locations or []) if spec else []:
            compileall.compile_dir(d, quiet=1, workers=1)


def start(tmp: Path, name: str, source: str, upstream: Proc, env: dict[str, str]) -> Proc:
    ep = ("127.0.0.1", upstream.port)
    yaml_text = configs.istio_yaml(ep, ep)
    admin = str(free_port())
    saved = dict(os.environ)
    os.environ.update(env)  # inherited by the sidecar (and --config's translating child)
    try:
        if source == "snapshot":
            snap = tg.translated_snapshot(tmp, name, yaml_text, "client")
            path = tmp / f"{name}.snapshot.json"
            path.write_text(json.dumps(snap, indent=1))
            argv = [*tg.diktyo_argv(), "sidecar", "--snapshot", str(path), "--admin-port", admin]
            listener = tg.CLIENT_LISTENER
        else:
            d = tmp / f"{name}-config"
            d.mkdir(exist_ok=True)
            (d / "mesh.yaml").write_text(yaml_text)
            argv = [*tg.diktyo_argv(), "sidecar", "--config", str(d), "--admin-port", admin]
            listener = ""
        return start_sidecar(name, argv, tmp / f"{name}.log", PROXY_CORE, listener=listener)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", action="append", default=[], help="NAME[:KEY=VALUE,...]")
    ap.add_argument("--reps", type=int, default=5, help="starts per variant (default 5)")
    ap.add_argument("--settle", type=float, default=1.0, help="seconds after the ready line")
    ap.add_argument("--source", choices=("snapshot", "config"), default="config")
    ap.add_argument("--modules", action="store_true", help="print /memory's optional modules")
    args = ap.parse_args()
    variants = [parse_variant(v) for v in (args.variant or ["current"])]
    for _, env in variants:
        byte_compile(env)
    rss: dict[str, list[int]] = {name: [] for name, _ in variants}
    ready: dict[str, list[float]] = {name: [] for name, _ in variants}  # spawn -> ready line
    with tempfile.TemporaryDirectory(prefix="idlerss-") as td:
        tmp = Path(td)
        upstream = tg.start_upstream(tmp, 1)
        try:
            for rep in range(args.reps):
                order = variants if rep % 2 == 0 else variants[::-1]
                for name, env in order:
                    t0 = time.monotonic()
                    p = start(tmp, name, args.source, upstream, env)
                    ready[name].append(time.monotonic() - t0)
                    try:
                        time.sleep(args.settle)
                        rss[name].append(p.rss_kib())
                        if args.modules and rep == 0:
                            url = f"http://127.0.0.1:{p.extra.get('admin')}/memory"
                            with urllib.request.urlopen(url, timeout=5) as r:
                                mem = json.loads(r.read())
                            print(f"{name}: modules {mem.get('python_modules')}, optional "
                                  f"{mem.get('optional_modules_loaded')}")  # fmt: skip
                    finally:
                        p.stop()
        finally:
            upstream.stop()
    base = statistics.median(rss[variants[0][0]])
    print(f"idle RSS {args.settle:g} s after ready, --source {args.source}, {args.reps} starts")
    for name, _ in variants:
        med = statistics.median(rss[name])
        print(
            f"{name:>16}: median {med / 1024:6.2f} MiB = {med * 1024 / 1e6:5.2f} MB "
            f"(delta {(med - base) / 1024:+.2f} MiB), ready after "
            f"{statistics.median(ready[name]):.2f} s;  samples KiB {rss[name]}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
