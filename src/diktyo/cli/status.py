"""``diktyo status``: the running local mesh, its control plane and every workload's ports."""

from __future__ import annotations

import argparse
import json
from typing import Any

from diktyo.cli._common import table


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "status",
        help="show the running local mesh and its workloads",
        description="Show the mesh started by 'diktyo up': control plane and dashboard URLs, and per workload replica its state, its sidecar's admin/inbound/outbound ports, how often its app and sidecar were restarted and why the last one ended (exit code or signal).",
    )
    p.add_argument("-o", "--output", choices=["table", "json"], default="table")
    p.set_defaults(func=run)


def _restarts(w: dict[str, Any]) -> str:
    """``2 (app 1, sidecar 1)``, like kubectl's RESTARTS summed over a pod's containers."""
    containers = w.get("containers") or {}
    total = int(w.get("restarts") or 0)
    parts = [f"{n} {c['restarts']}" for n, c in sorted(containers.items()) if c.get("restarts")]
    return f"{total} ({', '.join(parts)})" if parts else str(total)


def _last_exit(w: dict[str, Any]) -> str:
    """``sidecar: killed by SIGKILL (137)``: the latest termination of one of its containers."""
    last = w.get("last_exit")
    if not last:
        return "-"
    code = last.get("exit_code")
    return f"{last.get('container')}: {last.get('reason')}" + (
        f" ({code})" if code is not None else ""
    )


def run(args: argparse.Namespace) -> int:
    from diktyo.platform.state import running_state

    state = running_state()
    if state is None:
        if args.output == "json":
            print(json.dumps({"running": False}))
        else:
            print("no mesh is running (start one with 'diktyo up -f mesh.yaml' or 'diktyo demo')")
        return 3
    if args.output == "json":
        print(json.dumps({"running": True, **state}, indent=2))
        return 0
    print(f"mesh {state.get('name')!r}: {state.get('state')} (supervisor pid {state.get('pid')})")
    if state.get("state") == "orphaned":
        from diktyo.platform.state import orphaned_hint

        print(f"warning: {orphaned_hint(state)}")
    print(f"control plane: {state.get('control_plane')}")
    print(f"dashboard:     {state.get('dashboard')}")
    if state.get("gateway"):
        print(f"ingress:       {state.get('gateway')}")
    if state.get("capture"):
        net = f" (network {state['network']})" if state.get("network") else ""
        print(f"capture:       {state['capture']}{net}")
    rows = []
    for w in state.get("workloads", []):
        if w.get("netns"):  # transparent: the app's ports, captured by 15006
            inbound = ",".join(f"{k}->15006" for k in w.get("inbound_ports", {}))
        else:
            inbound = ",".join(f"{k}->{v}" for k, v in w.get("inbound_ports", {}).items())
        gw = ",".join(f"{k}->{v}" for k, v in w.get("gateway_ports", {}).items())
        rows.append(
            [
                w["name"],
                w["namespace"],
                w["state"],
                w.get("address", "127.0.0.1"),
                w.get("capture", "proxy"),
                str(w.get("admin_port", "")),
                inbound or (f"gateway {gw}" if gw else "-"),
                "15001" if w.get("netns") else str(w.get("outbound_port") or "-"),
                ",".join(str(v) for v in w.get("app_ports", {}).values()) or "-",
                _restarts(w),
                _last_exit(w),
            ]
        )
    print()
    print(
        table(
            rows,
            ["NAME", "NAMESPACE", "STATE", "ADDRESS", "CAPTURE", "ADMIN", "INBOUND", "OUTBOUND"]
            + ["APP", "RESTARTS", "LAST EXIT"],
        )
    )
    return 0
