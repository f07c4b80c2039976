"""``diktyo control-plane``: run the control plane alone (config folder + HTTP API), without workloads."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "control-plane",
        help="run the control plane alone",
        description="Serve Istio config from a watched folder to sidecars started elsewhere ('diktyo sidecar --control-plane URL --node ID'). Nodes and instances register through the HTTP API (POST /v1/registry/...).",
    )
    p.add_argument("--config", metavar="DIR", help="folder of Istio YAML to serve and watch")
    p.add_argument(
        "--port", type=int, default=15010, help="HTTP port on 127.0.0.1 (default 15010, 0 = pick)"
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument(
        "--sidecar-auth",
        choices=["token", "none"],
        default="token",
        help="how sidecars prove their identity before they get a snapshot or ACK: 'token' "
        "(their bootstrap token, the default) or 'none' (only where the network already "
        "confines who reaches the control plane, e.g. inside a Kubernetes cluster whose "
        "sidecars have no diktyo token; the admin API still needs the admin credential)",
    )
    p.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="also answer requests whose Host header is NAME (besides 127.0.0.1, localhost, "
        "[::1] and --host); others are refused against DNS rebinding (repeatable)",
    )
    p.add_argument(
        "--prometheus",
        metavar="URL",
        help="the dashboard reads its graph and charts from this Prometheus (e.g. "
        "http://127.0.0.1:9090, scraping the sidecars: 'diktyo prometheus-config') instead of "
        "the embedded store",
    )
    p.add_argument(
        "--store",
        metavar="URL",
        default="embedded",
        help="where config, registry and the mesh CA live: 'embedded' (this process's memory, "
        "the default) or etcd://HOST:PORT[,HOST:PORT...] (the client URLs of an etcd cluster); "
        "with etcd, run as many control-plane replicas as you want on the same store and give "
        "sidecars all their addresses (docs/fleet.md)",
    )
    p.add_argument(
        "--store-key-file",
        metavar="PATH",
        help="with an etcd store: the key that encrypts the mesh CA in etcd (32 random bytes, "
        "base64; created mode 0600 if absent). Give every replica the same file; it never goes "
        "into etcd (default: $DIKTYO_HOME/store.key)",
    )
    p.add_argument(
        "--replica-id",
        metavar="ID",
        help="this replica's name in the store (default: HOSTNAME-PID)",
    )
    p.add_argument(
        "--trust-domain",
        metavar="DOMAIN",
        help="SPIFFE trust domain of the workload certificates and identities "
        "(spiffe://DOMAIN/ns/NS/sa/SA); default $DIKTYO_TRUST_DOMAIN (the Helm chart's "
        "trustDomain), else cluster.local",
    )
    p.add_argument(
        "--log-level",
        metavar="LEVEL",
        help="debug, info, warning or error (Istio's trace/warn/critical/off are accepted); "
        "default $DIKTYO_LOG_LEVEL (the Helm chart's logLevel), else warning",
    )
    p.set_defaults(func=run)


def settings(args: argparse.Namespace, environ: Any = None) -> tuple[str, str]:
    """``(trust_domain, log_level)``: the flag, else the chart's ``DIKTYO_TRUST_DOMAIN`` /
    ``DIKTYO_LOG_LEVEL``, else cluster.local / warning. ``ValueError`` names a bad value's
    flag or variable and what is expected."""
    import os

    from diktyo.proxy.env import EnvError, _domain, _log_level  # the sidecar's own checks

    env = os.environ if environ is None else environ
    out = []
    for flag, var, check, default in (
        ("--trust-domain", "DIKTYO_TRUST_DOMAIN", _domain, "cluster.local"),
        ("--log-level", "DIKTYO_LOG_LEVEL", _log_level, "warning"),
    ):
        given = getattr(args, flag[2:].replace("-", "_"), None)
        name, raw = (flag, given) if given is not None else (var, env.get(var))
        if raw is None or (name == var and not raw.strip()):
            out.append(default)
            continue
        try:
            out.append(check(name, raw))
        except EnvError as exc:
            raise ValueError(str(exc).replace(f"{flag}=", f"{flag} ")) from None
    return out[0], out[1]


def open_backend(args: argparse.Namespace) -> Any:
    """The store backend named by ``--store`` (``ValueError`` with a hint if it is not valid)."""
    from diktyo.control.backend import EmbeddedBackend

    spec = args.store or "embedded"
    if spec == "embedded":
        return EmbeddedBackend()
    if not spec.startswith("etcd://"):
        raise ValueError(
            f"--store {spec!r}: use 'embedded' (the default) or "
            "etcd://HOST:PORT[,HOST:PORT...] (the client URLs of your etcd members)"
        )
    from diktyo.control.etcd.backend import EtcdBackend, parse_etcd_url
    from diktyo.security.admin_token import default_home

    key_file = args.store_key_file or str(default_home() / "store.key")
    return EtcdBackend(parse_etcd_url(spec), key_file=key_file, replica_id=args.replica_id)


async def _main(args: argparse.Namespace) -> int:
    from diktyo.control.server import ControlPlane
    from diktyo.security import admin_token

    try:
        token = admin_token.ensure()  # $DIKTYO_HOME/admin-token (0600): the CLI sends it
    except OSError as exc:  # a read-only home (a container): this run's token only
        token = admin_token.new_token()
        print(
            f"warning: cannot write the admin credential to {admin_token.token_path()} "
            f"({exc.strerror or exc}); using a random one for this run (set DIKTYO_HOME to a "
            "writable folder, or mount a token file there)",
            file=sys.stderr,
            flush=True,
        )
    from diktyo.control.backend import StoreUnavailable
    from diktyo.control.etcd.secrets import SealError
    from diktyo.snapshot.model import MeshConfig

    trust_domain, _ = settings(args)
    cp = ControlPlane(
        mesh=MeshConfig(trust_domain=trust_domain),
        backend=open_backend(args),
        config_dir=args.config,
        prometheus_url=args.prometheus,
        admin_token=token,
        admin_token_file=admin_token.token_path(),
        allowed_hosts=tuple(args.allowed_host),
        sidecar_auth=args.sidecar_auth == "token",
    )
    from diktyo.dashboard import mount as mount_dashboard

    mount_dashboard(cp)  # the UI at / (the control plane itself never imports the dashboard)
    try:
        url = await cp.start(args.host, args.port)
    except (StoreUnavailable, SealError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    print(
        f"control plane serving on {url}"
        + (f", config {args.config}" if args.config else "")
        + (
            f", store {args.store} as replica {cp.backend.replica_id}"
            if args.store != "embedded"
            else ""
        ),
        flush=True,
    )
    print(
        f"admin credential in {admin_token.token_path()} (mode 0600); dashboard: "
        f"{url}/?token={token}",
        flush=True,
    )
    from diktyo.control.ingest.kubernetes import watch_in_cluster  # k8s: in a pod, watch the API

    kube = watch_in_cluster(cp)
    if kube is not None:
        print(f"in a Kubernetes pod: watching the API server at {kube[0].base_url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    if kube is not None:
        kube[1].cancel()
    await cp.stop()
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        open_backend(args)
        _, log_level = settings(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import logging

    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.prometheus and not args.prometheus.startswith(("http://", "https://")):
        print(
            f"error: --prometheus {args.prometheus!r} must be a URL like http://127.0.0.1:9090",
            file=sys.stderr,
        )
        return 2
    try:
        import uvloop

        return uvloop.run(_main(args))
    except ImportError:  # pragma: no cover
        return asyncio.run(_main(args))
