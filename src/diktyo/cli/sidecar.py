"""``diktyo sidecar``: run the sidecar proxy (data plane) for one workload."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from diktyo.snapshot.model import Snapshot

DESCRIPTION = (
    "Run diktyo's sidecar proxy. Exactly one config source: --snapshot FILE (snapshot "
    "JSON), --config DIR (Istio YAML incl. ServiceEntry STATIC endpoints) or "
    "--control-plane URL --node ID. When ready it prints one JSON line on stdout: "
    '{"event":"ready","admin":PORT,"listeners":{"NAME":PORT},"version":"V"}; logs go '
    "to stderr. SIGTERM or POST /drain on the admin port drains and exits. "
    "'python -m diktyo.proxy' takes the same flags and starts with less memory."
)


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "sidecar",
        help="run a sidecar proxy from a snapshot file, an Istio YAML dir or a control plane",
        description=DESCRIPTION,
    )
    add_arguments(p)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The sidecar's flags (shared by ``diktyo sidecar`` and ``python -m diktyo.proxy``)."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--snapshot", metavar="FILE", help="snapshot JSON file (diktyo.snapshot)")
    src.add_argument("--config", metavar="DIR", help="directory of Istio YAML files")
    src.add_argument(
        "--control-plane", metavar="URL", help="control plane base URL, e.g. http://127.0.0.1:15010"
    )
    p.add_argument("--node", metavar="ID", help="node id (with --control-plane)")
    p.add_argument(
        "--token-file",
        metavar="FILE",
        help="file (mode 0600) holding this sidecar's bootstrap token, which proves its "
        "identity to the control plane and gets its workload certificate (default: the path "
        "in $DIKTYO_CA_TOKEN_FILE, set by 'diktyo up'; for a standalone control plane, an admin "
        "gets one with POST /v1/tokens {\"namespace\": NS, \"service_account\": SA})",
    )
    p.add_argument(
        "--admin-port",
        type=int,
        default=0,
        help="admin port (/ready, /stats/prometheus, ...); 0 = pick a free one",
    )
    p.add_argument(
        "--outbound-port",
        type=int,
        default=None,
        help="override the outbound listener's port (0 = pick a free one)",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=10.0,
        help="seconds to let in-flight requests finish on SIGTERM / drain",
    )
    p.add_argument(
        "--header-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="time a client has to send a whole request head, counted from its first byte "
        "(not reset by each byte); past it the sidecar answers 408 and closes (default 30)",
    )
    p.add_argument(
        "--admin-token-file",
        metavar="FILE",
        default=os.environ.get("DIKTYO_ADMIN_TOKEN_FILE", ""),
        help="file (mode 0600) with the bearer token that state-changing admin endpoints "
        "(POST /drain, /quitquitquit) need; created with a fresh token if missing. Default: "
        "$DIKTYO_ADMIN_TOKEN_FILE, else a token generated into "
        "$DIKTYO_HOME/sidecars/PID/admin-token (the ready line names the file)",
    )
    p.add_argument(
        "--access-log-buffer-kb",
        type=int,
        default=1024,
        metavar="KB",
        help="access log bytes kept for a slow reader of stdout (KiB, default 1024); lines "
        "beyond it are dropped and counted (access_log_lines_dropped), never waited for",
    )
    p.add_argument(
        "--accept-http-10",
        action="store_true",
        default=os.environ.get("DIKTYO_HTTP10", "") in ("1", "true"),
        help="accept HTTP/1.0 requests (they must still carry Host); by default they are "
        "answered 426 Upgrade Required, as Envoy and Istio do (env DIKTYO_HTTP10=1, like "
        "Istio's PILOT_HTTP10)",
    )
    p.add_argument(
        "--interception-mode",
        type=str.upper,
        default=os.environ.get("DIKTYO_INTERCEPTION_MODE", "NONE").upper() or "NONE",
        metavar="MODE",
        help="REDIRECT: iptables sends the app's traffic to 15001/15006 (transparent capture, "
        "Istio's ISTIO_META_INTERCEPTION_MODE); a snapshot without capture listeners then gets "
        "passthrough ones. NONE (default): explicit proxy mode. Env DIKTYO_INTERCEPTION_MODE",
    )
    p.add_argument(
        "--log-level",
        default="warning",
        choices=["debug", "info", "warning", "error"],
        help="stderr log level",
    )
    p.set_defaults(func=run)


def _light_reexec() -> None:
    """When run as the ``diktyo`` command, replace this process (same pid, stdio and signals)
    with ``python -m diktyo.proxy`` and the same flags: the CLI has imported every subcommand
    (pydantic models, the control plane...), ~15 MB the sidecar never uses. Set
    ``DIKTYO_SIDECAR_NO_EXEC=1`` to keep the current process."""
    if os.environ.get("DIKTYO_SIDECAR_NO_EXEC"):
        return
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    name = spec.name if spec is not None else ""
    file = os.path.basename(getattr(main, "__file__", "") or "")
    if name != "diktyo.cli.main" and file != "diktyo":
        return  # called in-process (tests, other tools): never exec
    if "sidecar" not in sys.argv:
        return
    rest = sys.argv[sys.argv.index("sidecar") + 1 :]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "diktyo.proxy", *rest])


def _standalone_snapshot(config_dir: str, outbound_port: int) -> Snapshot:
    """Standalone mode: the control plane's translator, composed here above proxy and control."""
    from diktyo.control.standalone import snapshot_from_dir

    return snapshot_from_dir(config_dir, outbound_port=outbound_port)


def run(args: argparse.Namespace) -> int:
    _light_reexec()
    from diktyo.proxy.access_log import NonBlockingLogHandler

    # logs go to stderr without ever blocking the event loop (a stalled reader drops lines)
    handler: logging.Handler
    try:
        handler = NonBlockingLogHandler("/dev/stderr")
    except OSError:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler])
    from diktyo.proxy.main import SidecarOptions
    from diktyo.proxy.main import run as run_sidecar

    if args.control_plane and not args.node:
        print("diktyo sidecar: --control-plane needs --node ID", file=sys.stderr)
        return 2
    opts = SidecarOptions(
        snapshot=args.snapshot,
        config=args.config,
        control_plane=args.control_plane,
        node=args.node,
        admin_port=args.admin_port,
        outbound_port=args.outbound_port,
        drain_timeout=args.drain_timeout,
        config_loader=_standalone_snapshot if args.config else None,

        header_timeout=args.header_timeout,
        accept_http_10=args.accept_http_10,
        admin_token_file=args.admin_token_file,
        access_log_buffer=max(1, args.access_log_buffer_kb) * 1024,
        interception_mode=args.interception_mode,
    )
    if getattr(args, "token_file", None):
        opts.token_file = args.token_file
    try:
        return run_sidecar(opts)
    except Exception as exc:  # config errors from --config: say what is wrong
        name = type(exc).__name__
        if name in ("ConfigLoadError", "SnapshotError", "FileNotFoundError", "AdminTokenError"):
            print(f"diktyo sidecar: {exc}", file=sys.stderr)
            return 1
        raise
