"""The ``diktyo`` command: one module per subcommand under ``diktyo.cli``.

Adding a subcommand: write ``diktyo/cli/<name>.py`` with ``register(subparsers)`` (it calls
``subparsers.add_parser`` and sets ``func`` with ``set_defaults``; ``func(args) -> int`` is the
exit code), and add one line to ``COMMANDS`` below. ``tests/cli/test_main.py`` checks that the
two agree.

Start-up cost: only the module of the command being run is imported. ``diktyo --help`` lists
``COMMANDS`` without importing any of them, so a module may import what it needs at the top;
heavy imports (pydantic, ruamel, aiohttp) still belong inside ``run`` when some of the
command's uses don't need them.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Iterable

import diktyo
from diktyo import _build

# command -> summary for `diktyo --help`; the same text as the module's add_parser(help=...)
COMMANDS: dict[str, str] = {
    "analyze": "check Istio YAML files for errors (offline, like istioctl analyze)",
    "apply": "apply Istio YAML to the running mesh",
    "control-plane": "run the control plane alone",
    "dashboard": "print and open the mesh dashboard",
    "delete": "delete Istio resources from the running mesh",
    "demo": "run Bookinfo on a local mesh (start here)",
    "down": "stop the running local mesh",
    "explain": "show how the mesh routes a request (matched rule, destination, timeout, retries)",
    "init": "print or install a pod's traffic-capture iptables rules (like istio-iptables)",
    "install": "render diktyo's Kubernetes manifests (control plane, sidecar injector, RBAC)",
    "kube-inject": "inject the diktyo sidecar into Kubernetes manifests (Deployments, Pods, ...)",
    "join": "run this host's workloads in the mesh and keep them registered (VM agent)",
    "load": "send HTTP load to a URL and print a status-code histogram and latency percentiles",
    "prometheus-config": "print a Prometheus scrape config for the mesh's sidecars",
    "proxy-config": "show the config of one sidecar (like istioctl proxy-config)",
    "proxy-status": "sync state of every sidecar (like istioctl proxy-status)",
    "sidecar": "run a sidecar proxy from a snapshot file, an Istio YAML dir or a control plane",
    "stat": "success rate, RPS and latency per workload or service",
    "status": "show the running local mesh and its workloads",
    "up": "start a local mesh from a mesh file",
}


def module_of(command: str) -> str:
    return "diktyo.cli." + command.replace("-", "_")


def build_parser(load: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The whole parser; with ``load``, only those commands' modules are imported and their
    parsers built, the others are listed by name and summary."""
    parser = argparse.ArgumentParser(
        prog="diktyo",
        description=(
            "diktyo: a service mesh in Python. Istio's YAML (VirtualService, DestinationRule, "
            "ServiceEntry, Gateway, ...), sidecars and a control plane, on one machine."
        ),
        epilog="Start with 'diktyo demo' for a whole Bookinfo mesh, or 'diktyo COMMAND --help'.",
    )
    parser.add_argument(
        "--version", action="version", version=f"diktyo {diktyo.__version__}, {_build.describe()}"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, summary in COMMANDS.items():
        if load is None or name in load:
            importlib.import_module(module_of(name)).register(sub)
        else:
            sub.add_parser(name, help=summary, add_help=False)
    return parser


def command_in(argv: list[str]) -> str | None:
    """The subcommand named in ``argv`` (top-level options take no values), if it is one."""
    for arg in argv:
        if arg == "--":
            return None
        if not arg.startswith("-"):
            return arg if arg in COMMANDS else None
    return None


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    command = command_in(argv)
    parser = build_parser(load=[command] if command else [])
    try:
        args = parser.parse_args(argv)
        func = getattr(args, "func", None)
        if func is None:
            parser.print_help()
            return 2
        code = int(func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not as a traceback at exit
        return code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return _quiet_broken_pipe()


def _quiet_broken_pipe() -> int:
    """Output piped into ``head`` & co.: the reader left, so stop quietly, as ``cat`` does.

    Python would print a traceback, and another error when it flushes stdout at exit; point
    stdout at /dev/null so that flush has nowhere to fail.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 141  # 128 + SIGPIPE, what a shell reports for a command killed by the signal


if __name__ == "__main__":
    sys.exit(main())
