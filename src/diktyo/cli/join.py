"""``diktyo join``: run this host's workloads in a mesh and keep them registered (the VM agent)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys

DESCRIPTION = """\
Join this host to a diktyo mesh, as Istio's VM agent does: for each workload named in the host
file, register into its WorkloadGroup with the bootstrap token, start its sidecar (and its app,
if the host file gives a command), register its WorkloadEntry '<group>-<address>', run the
group's health probe and report each change, restart what exits, and fail over between the
control plane addresses. When the agent stops, the control plane removes the entries after its
grace period (PILOT_WORKLOAD_ENTRY_GRACE_PERIOD, default 10s).

Before joining, apply the WorkloadGroup (and a ServiceEntry whose workloadSelector selects the
group's labels) to the control plane, and get a bootstrap token for the group's namespace and
service account from an admin:
  curl -H "Authorization: Bearer $(cat ~/.diktyo/admin-token)" -H content-type:application/json \\
       -d '{"namespace": "shop", "service_account": "ratings-sa", "ttl": 86400}' \\
       http://CONTROL-PLANE/v1/tokens

Host file (YAML):
  address: 127.0.0.2        # this host's address; sidecars listen on it (default 127.0.0.1)
                            # (run in a network namespace: the namespace's address)
                            # one unicast address: not 0.0.0.0/::, multicast or broadcast;
                            # loopback only when the control plane is on this host too
  network: ""               # optional Istio network name
  locality: eu-west/zone-a  # optional region/zone/subzone
  workloads:
  - group: ratings          # WorkloadGroup name
    namespace: shop         # its namespace (default: default)
    command: ["python3", "ratings.py"]  # optional app; gets PORT, PORT_<port>, HTTP_PROXY
    env: {LOG_LEVEL: info}  # optional extra environment for the app
    labels: {rack: r1}      # optional labels added to the group's
    tokenFile: /etc/diktyo/ratings.token  # optional, else --token-file

Once every workload is registered it prints one JSON line on stdout:
{"event": "joined", "workloads": [...]} with each workload's entry name and ports.
SIGTERM or Ctrl-C stops apps, then sidecars, then the registrations.
"""


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]  # argparse private generic
    p = subparsers.add_parser(
        "join",
        help="run this host's workloads in the mesh and keep them registered (VM agent)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--control-plane",
        action="append",
        required=True,
        metavar="URL",
        help="control plane address, e.g. http://10.0.0.5:15010; repeat it or separate "
        "addresses with commas to list replicas (tried in turn)",
    )
    p.add_argument(
        "--token-file",
        metavar="FILE",
        help="file (mode 0600) with the bootstrap token for the workloads' namespace and "
        "service account (a host file workload's tokenFile overrides it)",
    )
    p.add_argument("--host-file", required=True, metavar="FILE", help="the host file (see above)")
    p.add_argument(
        "--log-dir",
        metavar="DIR",
        help="folder for the sidecars' and apps' output (default: a temporary folder)",
    )
    p.add_argument(
        "--ready-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="time each workload has to register, start its sidecar and app (default 30)",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from diktyo.platform.join import JoinAgent, JoinError, load_host_file

    urls = [u.strip() for arg in args.control_plane for u in arg.split(",") if u.strip()]
    try:
        spec = load_host_file(args.host_file, urls)
    except JoinError as exc:
        print(f"diktyo join: {exc}", file=sys.stderr)
        return 2
    agent = JoinAgent(
        spec,
        urls,
        args.token_file,
        log_dir=args.log_dir,
        ready_timeout=args.ready_timeout,
    )

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            started = loop.create_task(agent.start())
            waiter = loop.create_task(stop.wait())
            await asyncio.wait({started, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if not started.done():
                started.cancel()
                await asyncio.gather(started, return_exceptions=True)
                return 130
            waiter.cancel()
            try:
                started.result()
            except JoinError as exc:
                print(f"diktyo join: {exc}", file=sys.stderr)
                return 1
            print(json.dumps({"event": "joined", "workloads": agent.describe()}), flush=True)
            await stop.wait()
            return 0
        finally:
            await agent.stop()

    return asyncio.run(main())
