"""Traffic capture rules for the ``diktyo-init`` container (Istio's istio-init, REDIRECT mode).

``render_rules(plan)`` gives ``iptables-restore`` input for the pod's network namespace: inbound
TCP goes to the sidecar's inbound capture port, outbound TCP to its outbound capture port;
traffic of the proxy's own uid/gid (1337) and loopback traffic of the app are left alone.
``render_script(plan)`` wraps it in the ``sh`` script the init container runs. Debian's
``iptables`` is the nftables backend (iptables-nft), so the same rules land in nftables.
"""

from __future__ import annotations

from dataclasses import dataclass

INBOUND, REDIRECT, IN_REDIRECT, OUTPUT = (
    "DIKTYO_INBOUND", "DIKTYO_REDIRECT", "DIKTYO_IN_REDIRECT", "DIKTYO_OUTPUT")


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


def _split(value: str) -> list[str]:
    return [p.strip() for p in value.split(",") if p.strip()]


def render_rules(plan: CapturePlan) -> str:
    """``iptables-restore`` input (nat table) for the plan."""
    uid, gid = plan.proxy_uid, plan.proxy_gid
    r = ["*nat", f":{INBOUND} - [0:0]", f":{REDIRECT} - [0:0]", f":{IN_REDIRECT} - [0:0]",
         f":{OUTPUT} - [0:0]",
         f"-A {REDIRECT} -p tcp -j REDIRECT --to-ports {plan.outbound_port}",
         f"-A {IN_REDIRECT} -p tcp -j REDIRECT --to-ports {plan.inbound_port}"]
    # inbound
    if plan.include_inbound_ports.strip():
        r.append(f"-A PREROUTING -p tcp -j {INBOUND}")
        if plan.include_inbound_ports.strip() == "*":
            for port in plan.exclude_inbound_ports:
                r.append(f"-A {INBOUND} -p tcp --dport {port} -j RETURN")
            r.append(f"-A {INBOUND} -p tcp -j {IN_REDIRECT}")
        else:
            for name in _split(plan.include_inbound_ports):
                r.append(f"-A {INBOUND} -p tcp --dport {int(name)} -j {IN_REDIRECT}")
    # outbound
    r.append(f"-A OUTPUT -p tcp -j {OUTPUT}")
    for port in plan.exclude_outbound_ports:
        r.append(f"-A {OUTPUT} -p tcp --dport {port} -j RETURN")
    r += [
        # the proxy's inbound upstream connections come from 127.0.0.6 (Istio's passthrough)
        f"-A {OUTPUT} -o lo -s 127.0.0.6/32 -j RETURN",
        # app calling its own pod IP through lo: back through the inbound path
        f"-A {OUTPUT} ! -d 127.0.0.1/32 -o lo -p tcp -m owner --uid-owner {uid} -j {IN_REDIRECT}",
        f"-A {OUTPUT} -o lo -m owner ! --uid-owner {uid} -j RETURN",
        f"-A {OUTPUT} -m owner --uid-owner {uid} -j RETURN",
        f"-A {OUTPUT} ! -d 127.0.0.1/32 -o lo -p tcp -m owner --gid-owner {gid} -j {IN_REDIRECT}",
        f"-A {OUTPUT} -o lo -m owner ! --gid-owner {gid} -j RETURN",
        f"-A {OUTPUT} -m owner --gid-owner {gid} -j RETURN",
        f"-A {OUTPUT} -d 127.0.0.1/32 -j RETURN",
    ]
    for cidr in plan.exclude_outbound_ip_ranges:
        r.append(f"-A {OUTPUT} -d {cidr} -j RETURN")
    include = plan.include_outbound_ip_ranges.strip()
    if include == "*":
        r.append(f"-A {OUTPUT} -j {REDIRECT}")
    else:
        for cidr in _split(include):
            r.append(f"-A {OUTPUT} -d {cidr} -j {REDIRECT}")
    r.append("COMMIT")
    return "\n".join(r) + "\n"


def render_script(plan: CapturePlan) -> str:
    """The init container's ``sh -c`` script: apply the rules atomically, then show the table."""
    return f"set -eu\niptables-restore --noflush <<'RULES'\n{render_rules(plan)}RULES\niptables-save -t nat\n"
