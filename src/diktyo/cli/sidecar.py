"""``diktyo sidecar``: run the sidecar proxy (data plane) for one workload."""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # argparse only in the process that parses: not in the re-executed sidecar
    import argparse

    from diktyo.snapshot.model import Snapshot

# the flags ``diktyo sidecar`` parsed, handed to the re-executed ``python -m diktyo.proxy``
# (JSON), which then needs no argparse (with gettext and locale: ~0.4 MiB, issue 11)
PARSED_ARGS_ENV = "DIKTYO_SIDECAR_ARGS"
ARGV_KEY = "__argv__"

DESCRIPTION = (
    "Run diktyo's sidecar proxy. Exactly one config source: --snapshot FILE (snapshot "
    "JSON), --config DIR (Istio YAML incl. ServiceEntry STATIC endpoints) or "
    "--control-plane URL --node ID. When ready it prints one JSON line on stdout: "
    '{"event":"ready","admin":PORT,"listeners":{"NAME":PORT},"version":"V"}; logs go '
    "to stderr. SIGTERM or POST /drain on the admin port drains and exits. "
    "'python -m diktyo.proxy' takes the same flags and starts with less memory. In a "
    "Kubernetes pod every setting comes from the environment the injector sets "
    "(DIKTYO_CONTROL_PLANE, DIKTYO_NODE or POD_NAME+POD_NAMESPACE, DIKTYO_ADMIN_PORT, "
    "DIKTYO_OUTBOUND_PORT, DIKTYO_STATUS_PORT, DIKTYO_READINESS_PORT, DIKTYO_LOG_LEVEL, "
    "DIKTYO_KUBE_APP_PROBERS, ...; see docs/kubernetes.md); flags override the environment."
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
    src = p.add_mutually_exclusive_group()  # or $DIKTYO_CONTROL_PLANE (checked in run)
    src.add_argument("--snapshot", metavar="FILE", help="snapshot JSON file (diktyo.snapshot)")
    src.add_argument("--config", metavar="DIR", help="directory of Istio YAML files")
    src.add_argument(
        "--control-plane",
        metavar="URL[,URL...]",
        help="control plane base URL, e.g. http://127.0.0.1:15010; several replicas "
        "(comma-separated) are failed over between (docs/fleet.md)",
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
        default=None,
        help="admin port (/ready, /stats/prometheus, ...) on 127.0.0.1; 0 = pick a free one "
        "(default 0, env DIKTYO_ADMIN_PORT)",
    )
    p.add_argument(
        "--status-port",
        type=int,
        default=None,
        help="status port for the kubelet, on 0.0.0.0 (Istio's 15020): /healthz/ready, "
        "/app-health/<container>/readyz|livez|startupz, /stats/prometheus (env "
        "DIKTYO_STATUS_PORT; default: none)",
    )
    p.add_argument(
        "--readiness-port",
        type=int,
        default=None,
        help="readiness port on 0.0.0.0 (Istio's 15021): /healthz/ready (env "
        "DIKTYO_READINESS_PORT; default: none)",
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
        default=None,
        help="seconds to let in-flight requests finish on SIGTERM / drain (default 10, env "
        "DIKTYO_DRAIN_TIMEOUT)",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=None,
        metavar="N",
        help="worker processes serving the listeners, Istio's ProxyConfig concurrency: 0 = one "
        "per core, default 1 (Istio's sidecar default is 2; each worker costs its own memory, "
        "see docs/decisions.md). The workers share the listener sockets, circuit-breaker limits "
        "(for the sidecar as a whole) and one /stats/prometheus (summed); a worker that dies is "
        "restarted. Env DIKTYO_CONCURRENCY",
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
        default=None,
        choices=["debug", "info", "warning", "error"],
        help="stderr log level (default warning, env DIKTYO_LOG_LEVEL)",
    )
    p.set_defaults(func=run)


def _light_reexec(args: argparse.Namespace) -> None:
    """When run as the ``diktyo`` command, replace this process (same pid, stdio and signals)
    with ``python -m diktyo.proxy`` and the same flags: the CLI has imported every subcommand
    (pydantic models, the control plane...), ~15 MB the sidecar never uses. The flags as
    parsed here go along in ``$DIKTYO_SIDECAR_ARGS``, so the new process does not parse them
    again (no argparse in it). Set ``DIKTYO_SIDECAR_NO_EXEC=1`` to keep the current process."""
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
    import json

    plain = (str, int, float, bool, type(None))
    parsed: dict[str, object] = {k: v for k, v in vars(args).items() if isinstance(v, plain)}
    parsed[ARGV_KEY] = rest  # the new process uses them only for this very argv
    sys.stdout.flush()
    sys.stderr.flush()
    os.environ[PARSED_ARGS_ENV] = json.dumps(parsed)
    try:
        os.execv(sys.executable, [sys.executable, "-m", "diktyo.proxy", *rest])
    finally:  # only when exec failed
        os.environ.pop(PARSED_ARGS_ENV, None)


class ConfigLoadError(ValueError):
    """``--config DIR`` has errors; ``str()`` lists each as ``FILE:LINE:COL: error: ...``."""


def _standalone_snapshot(config_dir: str, outbound_port: int) -> Snapshot:
    """Standalone mode: the control plane's translator, composed here above proxy and control.

    It runs in a short-lived child process (``python -m diktyo.control.standalone``) that
    prints the snapshot as JSON: the YAML loader, the typed models (pydantic, ruamel) and the
    translator never load into the long-running sidecar, which keeps its idle memory down."""
    import subprocess

    from diktyo.snapshot.codec import decode

    argv = [sys.executable, "-m", "diktyo.control.standalone", config_dir,
            "--outbound-port", str(outbound_port)]  # fmt: skip
    res = subprocess.run(argv, capture_output=True, check=False, timeout=300)
    if res.returncode != 0:
        err = res.stderr.decode(errors="replace").strip()
        if res.returncode == 1 and err:
            raise ConfigLoadError(err)
        raise ConfigLoadError(
            f"translating {config_dir} failed (exit status {res.returncode}):\n{err}"
        )
    return decode(res.stdout)


# option defaults when neither a flag nor the environment sets them
_DEFAULTS = {"admin_port": 0, "drain_timeout": 10.0, "log_level": "warning"}


def resolve(args: argparse.Namespace, environ: dict[str, str] | None = None) -> dict[str, object]:
    """Flags over ``DIKTYO_*`` environment over defaults: the sidecar's settings.

    Raises ``diktyo.proxy.env.EnvError`` for a bad environment value."""
    from diktyo.proxy.env import sidecar_env

    env = sidecar_env(os.environ if environ is None else environ)
    out: dict[str, object] = dict(_DEFAULTS)
    out.update(env)
    for name in ("control_plane", "node", "admin_port", "status_port", "readiness_port",
                 "outbound_port", "drain_timeout", "log_level", "token_file", "concurrency"):
        value = getattr(args, name, None)
        if value is not None:
            out[name] = value
    if args.snapshot or args.config:
        out.pop("control_plane", None)  # an explicit file/dir source wins over the env's URL
    return out


def run(args: argparse.Namespace) -> int:
    _light_reexec(args)
    from diktyo.proxy.env import EnvError

    try:
        settings = resolve(args)
    except EnvError as exc:
        print(f"diktyo sidecar: {exc}", file=sys.stderr)
        return 2
    if not (args.snapshot or args.config or settings.get("control_plane")):
        print(
            "diktyo sidecar: no config source: pass --snapshot FILE, --config DIR or "
            "--control-plane URL (or set DIKTYO_CONTROL_PLANE)",
            file=sys.stderr,
        )
        return 2
    from diktyo.proxy.access_log import NonBlockingLogHandler

    # logs go to stderr without ever blocking the event loop (a stalled reader drops lines)
    handler: logging.Handler
    try:
        handler = NonBlockingLogHandler("/dev/stderr")
    except OSError:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=str(settings["log_level"]).upper(), handlers=[handler])
    from diktyo.proxy.main import SidecarOptions
    from diktyo.proxy.main import run as run_sidecar

    if settings.get("control_plane") and not settings.get("node"):
        print(
            "diktyo sidecar: --control-plane needs --node ID (or DIKTYO_NODE, or POD_NAME and "
            "POD_NAMESPACE as the injector sets them)",
            file=sys.stderr,
        )
        return 2
    opts = SidecarOptions(
        snapshot=args.snapshot,
        config=args.config,
        config_loader=_standalone_snapshot if args.config else None,

        header_timeout=args.header_timeout,
        accept_http_10=args.accept_http_10,
        admin_token_file=args.admin_token_file,
        access_log_buffer=max(1, args.access_log_buffer_kb) * 1024,
        interception_mode=args.interception_mode,
    )
    for name, value in settings.items():
        if name != "log_level":
            setattr(opts, name, value)
    try:
        return run_sidecar(opts)
    except Exception as exc:  # config errors from --config: say what is wrong
        name = type(exc).__name__
        if name in ("ConfigLoadError", "SnapshotError", "FileNotFoundError", "AdminTokenError"):
            print(f"diktyo sidecar: {exc}", file=sys.stderr)
            return 1
        raise
