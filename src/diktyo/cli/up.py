"""``diktyo up``: start a local mesh (control plane, sidecars, apps, gateways) from a mesh file."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from diktyo.platform.mesh import MeshFileError, load_mesh


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "up",
        help="start a local mesh from a mesh file",
        description=(
            "Start a local mesh: the control plane, then per workload replica its sidecar and "
            "its app, and the ingress gateways. Runs in the foreground until Ctrl-C (or 'diktyo "
            "down'), then stops apps, sidecars and the control plane in that order. "
            "Sidecars and apps outlive a killed supervisor (they keep serving); run 'diktyo up' "
            "with the same mesh file again to adopt them (the control plane comes back on its "
            "port), or 'diktyo down' to stop them. Mesh file format: docs/mesh-file.md."
        ),
    )
    p.add_argument(
        "-f", "--file", required=True, metavar="MESH_YAML", help="the mesh file (mesh.yaml)"
    )
    p.add_argument(
        "--config",
        metavar="DIR",
        help="folder of Istio YAML to serve and watch (overrides 'config:' in the mesh file)",
    )
    p.add_argument(
        "--detach", "-d", action="store_true", help="run in the background; return once ready"
    )
    p.add_argument(
        "--timeout", type=float, default=120.0, help="seconds to wait for --detach (default 120)"
    )
    p.add_argument(
        "--prometheus",
        metavar="URL",
        help="the dashboard reads its graph and charts from this Prometheus (e.g. "
        "http://127.0.0.1:9090; 'diktyo prometheus-config' prints its scrape config) instead "
        "of the control plane's embedded store",
    )
    p.add_argument(
        "--capture",
        choices=["proxy", "transparent", "auto"],
        help="override the mesh file's 'capture:': proxy (apps use HTTP_PROXY), transparent "
        "(each replica in its own network namespace, iptables capture; needs root) or auto "
        "(transparent when possible); see docs/transparent.md",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import asyncio

    from diktyo.platform.run import already_running_message, run_detached, serve_mesh

    try:
        spec = load_mesh(args.file)
    except MeshFileError as exc:
        print(str(exc), file=sys.stderr)
        print(
            f"error: {args.file} is not a valid mesh file (format: docs/mesh-file.md)",
            file=sys.stderr,
        )
        return 2
    if getattr(args, "capture", None):
        spec = spec.model_copy(update={"capture": args.capture})
    config_dir = Path(args.config).resolve() if args.config else None
    if config_dir is not None and not config_dir.is_dir():
        print(f"error: --config {args.config}: no such folder", file=sys.stderr)
        return 2
    if args.prometheus:
        if not args.prometheus.startswith(("http://", "https://")):
            print(
                f"error: --prometheus {args.prometheus!r} must be a URL like http://127.0.0.1:9090",
                file=sys.stderr,
            )
            return 2
        os.environ["DIKTYO_PROMETHEUS"] = args.prometheus  # read by the mesh's ControlPlane
    from diktyo.platform.state import running_state

    adopt = None
    state = running_state()
    if state is not None and state.get("state") == "orphaned":
        from diktyo.platform.state import pid_alive

        keeper = int(state.get("keeper_pid") or 0)
        mine = os.environ.get("DIKTYO_KEEPER_PID") == str(keeper)  # started by that keeper
        if keeper and pid_alive(keeper) and not mine:
            print(
                f"error: the supervisor of mesh {state.get('name')!r} died; its keeper (pid "
                f"{keeper}) is starting a new one that adopts the mesh: see 'diktyo status'",
                file=sys.stderr,
            )
            return 1
        if state.get("mesh_file") != str(Path(args.file).resolve()):
            print(
                f"error: {already_running_message()}\n(it was started from "
                f"{state.get('mesh_file') or 'diktyo demo'}, not {args.file})",
                file=sys.stderr,
            )
            return 1
        if state.get("capture") == "transparent":
            # namespaces are not adopted: stop what runs, remove the network, start anew
            from diktyo.platform.run import stop_orphaned

            print(
                f"mesh {state.get('name')!r} (transparent capture) runs without its supervisor "
                f"(pid {state.get('pid')} is gone): stopping it and starting it anew",
                flush=True,
            )
            if stop_orphaned(state) != 0:
                return 1
        else:
            adopt = state  # the mesh of this file runs on without its supervisor: take it over
        if adopt is not None and config_dir is None and state.get("config_dir"):
            config_dir = Path(state["config_dir"])  # the config folder it was started with
        if adopt is not None:
            print(
                f"mesh {state.get('name')!r} runs without its supervisor (pid "
                f"{state.get('pid')} is gone): adopting its sidecars and apps",
                flush=True,
            )
    elif state is not None:
        print(f"error: {already_running_message()}", file=sys.stderr)
        return 1
    if args.detach:
        argv = ["up", "-f", str(Path(args.file).resolve())]
        if config_dir is not None:
            argv += ["--config", str(config_dir)]
        if args.prometheus:
            argv += ["--prometheus", args.prometheus]
        if getattr(args, "capture", None):
            argv += ["--capture", args.capture]
        return run_detached(argv, args.timeout)
    main = serve_mesh(spec, config_dir=config_dir, mesh_file=args.file, adopt=adopt)
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(main)
    return uvloop.run(main)
