"""Traffic capture for the ``diktyo-init`` container (Istio's istio-init, REDIRECT mode).

``CapturePlan`` is what a pod asks for (config defaults and ``traffic.sidecar.istio.io/*``
annotations, parsed and checked by ``pod.capture_plan``); ``init_args(plan)`` is the
``diktyo init --apply`` command line that installs the rules in the pod's network namespace.
The rules themselves are ``diktyo init``'s (``diktyo.platform.capture_rules``, golden-tested
against Istio's istio-iptables): inbound TCP to 15006, outbound TCP to 15001, the proxy's own
uid/gid (1337) and the app's loopback traffic left alone.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class CapturePlan:
    """What to capture. ``"*"`` means all; ports and CIDRs are lists of strings as in annotations."""

    outbound_port: int = 15001
    inbound_port: int = 15006
    proxy_uid: int = 1337
    proxy_gid: int = 1337
    include_inbound_ports: str = "*"  # "*" or "9080,9443"; "" captures no inbound traffic
    exclude_inbound_ports: tuple[int, ...] = (15090, 15021, 15020)
    include_outbound_ip_ranges: str = "*"  # "*" or "10.0.0.0/8,..."
    exclude_outbound_ip_ranges: tuple[str, ...] = ()
    exclude_outbound_ports: tuple[int, ...] = ()


def init_args(plan: CapturePlan) -> list[str]:
    """The ``diktyo init`` command line for the plan, with istio-iptables' own flag names (as
    Istio's ``istio-init`` runs ``istio-iptables -p 15001 -z 15006 -u 1337 -m REDIRECT -i '*'
    -x "" -b '*' -d 15090,15021,15020``). Every value is re-rendered from parsed ports and
    CIDRs (``pod.capture_plan``), so an annotation cannot add a flag."""
    args = [
        "init", "--apply",
        "-p", str(plan.outbound_port),
        "-z", str(plan.inbound_port),
        "-u", str(plan.proxy_uid),
        "-g", str(plan.proxy_gid),
        "-m", "REDIRECT",
        "-i", plan.include_outbound_ip_ranges.strip(),
        "-x", ",".join(plan.exclude_outbound_ip_ranges),
        "-b", plan.include_inbound_ports.strip(),
        "-d", ",".join(map(str, plan.exclude_inbound_ports)),
    ]  # fmt: skip
    if plan.exclude_outbound_ports:
        args += ["-o", ",".join(map(str, plan.exclude_outbound_ports))]
    return args
