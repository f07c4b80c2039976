"""Standalone mode: a folder of Istio YAML -> one Snapshot, no control plane process.

``diktyo sidecar --config DIR`` runs on this: ServiceEntries with STATIC endpoints are the
registry, VirtualServices and DestinationRules route over them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from diktyo.api import ConfigError, load_paths
from diktyo.control.model import ProxyNode, PushContext
from diktyo.control.translate import registry_from_service_entries, translate
from diktyo.snapshot.model import Node, Snapshot


class ConfigLoadError(ValueError):
    """The config folder has errors; ``str()`` lists every one as ``FILE:LINE:COL: error: ...``."""

    def __init__(self, errors: list[ConfigError]) -> None:
        self.errors = errors
        lines = [f"{len(errors)} error(s) in config:"] + [str(e) for e in errors]
        super().__init__("\n".join(lines))


def snapshot_from_dir(
    config_dir: str | Path,
    *,
    outbound_port: int = 0,
    node_id: str = "standalone",
    version: str | None = None,
) -> Snapshot:
    """Load every ``*.yaml``/``*.yml`` under ``config_dir`` and translate it for a standalone node.

    Raises ``ConfigLoadError`` when any document has an error (warnings are ignored).
    ``version`` defaults to a hash of the input files' names and contents.
    """
    path = Path(config_dir)
    if not path.exists():
        raise ConfigLoadError(
            [
                ConfigError(
                    str(path), 0, 0, "", "config path does not exist", "pass a folder of YAML"
                )
            ]
        )
    result = load_paths([path])
    errors = [e for e in result.errors if e.severity == "error"]
    if errors:
        raise ConfigLoadError(errors)
    if version is None:
        version = _hash_inputs(path)
    registry = registry_from_service_entries(result.resources)
    push = PushContext(resources=tuple(result.resources), registry=registry, version=version)
    node = Node(id=node_id, workload=node_id, mode="standalone")
    return translate(ProxyNode(node=node, outbound_port=outbound_port), push)


def _hash_inputs(path: Path) -> str:
    h = hashlib.sha256()
    files = (
        [path]
        if path.is_file()
        else sorted(f for f in path.rglob("*") if f.suffix in (".yaml", ".yml") and f.is_file())
    )
    for f in files:
        h.update(str(f.relative_to(path) if f != path else f.name).encode())
        h.update(b"\0")
        h.update(f.read_bytes())
        h.update(b"\0")
    return h.hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    """``python -m diktyo.control.standalone DIR [--outbound-port N]``: the snapshot (JSON,
    ``diktyo.snapshot.codec``) on stdout; the config's errors on stderr with exit status 1.

    ``diktyo sidecar --config DIR`` runs this as a short-lived child process, so the sidecar
    itself never loads the YAML loader, the typed models (pydantic, ruamel) or the translator.
    """
    import argparse
    import sys

    from diktyo.snapshot.codec import encode

    p = argparse.ArgumentParser(
        prog="python -m diktyo.control.standalone",
        description="Translate a folder of Istio YAML into a standalone sidecar's snapshot "
        "(JSON on stdout).",
    )
    p.add_argument("config_dir", metavar="DIR", help="directory of Istio YAML files")
    p.add_argument("--outbound-port", type=int, default=0, help="outbound listener port")
    args = p.parse_args(argv)
    try:
        snap = snapshot_from_dir(args.config_dir, outbound_port=args.outbound_port)
    except ConfigLoadError as exc:
        print(exc, file=sys.stderr)
        return 1
    sys.stdout.buffer.write(encode(snap))
    sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
