"""Packet-capture rules: the nat-table rules Istio's ``istio-iptables`` installs in a pod.

Theory of operation
-------------------
``CaptureConfig`` holds ``istio-iptables``' settings (proxy port 15001, inbound capture port
15006, the proxy's uid/gid 1337, the include/exclude lists). ``build_rules(cfg)`` turns it into
the lines of an ``iptables-restore`` file for the ``nat`` table, in the order
``istio-iptables`` (REDIRECT mode, IPv4) writes them:

* chains ``ISTIO_INBOUND``, ``ISTIO_REDIRECT`` (-> 15001), ``ISTIO_IN_REDIRECT`` (-> 15006),
  ``ISTIO_OUTPUT``; the inbound tunnel port 15008 is never captured;
* inbound: ``PREROUTING`` jumps to ``ISTIO_INBOUND`` when any inbound port is included; ``*``
  captures every port except ``excludeInboundPorts``, a list captures only those ports;
* outbound: ``OUTPUT`` jumps to ``ISTIO_OUTPUT``; excluded outbound ports return first; the
  proxy's own traffic (by uid, then by gid) returns, except the proxy calling its own pod
  address over ``lo`` (app -> sidecar -> same pod's inbound), which goes to 15006; apps talking
  to ``127.0.0.1`` return; excluded IP ranges return; included ports and IP ranges (``*`` =
  all) go to ``ISTIO_REDIRECT``.

Pure code, no I/O: ``diktyo init`` prints or applies the result, the local mesh applies it in
each workload's network namespace. ``from_annotations`` reads the
``traffic.sidecar.istio.io/*`` pod annotations with the defaults Istio's injector uses.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, replace

PROXY_PORT = 15001  # outbound capture (Envoy's virtualOutbound)
INBOUND_CAPTURE_PORT = 15006  # inbound capture (virtualInbound)
INBOUND_TUNNEL_PORT = 15008  # HBONE; never captured
PROXY_UID = "1337"
# what Istio's injector passes to -d: Envoy's Prometheus port, readiness, merged metrics/status
DEFAULT_EXCLUDE_INBOUND_PORTS = "15090,15021,15020"

CHAINS = ("ISTIO_INBOUND", "ISTIO_REDIRECT", "ISTIO_IN_REDIRECT", "ISTIO_OUTPUT")

# pod annotation -> CaptureConfig field
ANNOTATIONS: dict[str, str] = {
    "traffic.sidecar.istio.io/includeInboundPorts": "inbound_ports_include",
    "traffic.sidecar.istio.io/excludeInboundPorts": "inbound_ports_exclude",
    "traffic.sidecar.istio.io/includeOutboundIPRanges": "outbound_ip_ranges_include",
    "traffic.sidecar.istio.io/excludeOutboundIPRanges": "outbound_ip_ranges_exclude",
    "traffic.sidecar.istio.io/includeOutboundPorts": "outbound_ports_include",
    "traffic.sidecar.istio.io/excludeOutboundPorts": "outbound_ports_exclude",
    "traffic.sidecar.istio.io/excludeInterfaces": "exclude_interfaces",
    "sidecar.istio.io/interceptionMode": "interception_mode",
}


class CaptureConfigError(ValueError):
    """A setting ``istio-iptables`` would refuse; the message names the setting."""


@dataclass(frozen=True, slots=True)
class CaptureConfig:
    """``istio-iptables``' settings (its flag in brackets). Lists are comma-separated strings,
    as in the annotations; ``*`` means all."""

    proxy_port: int = PROXY_PORT  # -p
    inbound_capture_port: int = INBOUND_CAPTURE_PORT  # -z
    inbound_tunnel_port: int = INBOUND_TUNNEL_PORT  # -e (not captured)
    proxy_uid: str = PROXY_UID  # -u, may be a list
    proxy_gid: str = PROXY_UID  # -g, may be a list
    interception_mode: str = "REDIRECT"  # -m: REDIRECT | NONE (TPROXY is not supported)
    inbound_ports_include: str = ""  # -b
    inbound_ports_exclude: str = ""  # -d
    outbound_ports_include: str = ""  # -q
    outbound_ports_exclude: str = ""  # -o
    outbound_ip_ranges_include: str = ""  # -i
    outbound_ip_ranges_exclude: str = ""  # -x
    exclude_interfaces: str = ""  # -c
    host_loopback_cidr: str = "127.0.0.1/32"  # --ipv4-host-loopback-cidr (Istio's default)

    @classmethod
    def injected(cls, **changes: object) -> CaptureConfig:
        """The settings Istio's sidecar injector passes to ``istio-iptables`` for a pod
        without annotations: capture all inbound ports except 15090/15021/15020, all outbound
        IP ranges."""
        base = cls(
            inbound_ports_include="*",
            inbound_ports_exclude=DEFAULT_EXCLUDE_INBOUND_PORTS,
            outbound_ip_ranges_include="*",
        )
        return replace(base, **changes)  # type: ignore[arg-type]  # replace() rejects unknown field names at run time

    def validate(self) -> CaptureConfig:
        """Self if every setting is valid; raises ``CaptureConfigError`` naming the bad one."""
        if self.interception_mode not in ("REDIRECT", "NONE"):
            raise CaptureConfigError(
                f"interception mode {self.interception_mode!r} is not supported: use REDIRECT "
                "(NAT redirect, Istio's default) or NONE (no capture); TPROXY is not implemented"
            )
        for name in ("proxy_port", "inbound_capture_port", "inbound_tunnel_port"):
            _port(str(getattr(self, name)), name)
        for name in (
            "inbound_ports_exclude",
            "outbound_ports_include",
            "outbound_ports_exclude",
        ):
            for p in split(getattr(self, name)):
                _port(p, name)
        if self.inbound_ports_include != "*":
            for p in split(self.inbound_ports_include):
                _port(p, "inbound_ports_include")
        for name in ("proxy_uid", "proxy_gid"):
            ids = split(getattr(self, name))
            if not ids:
                raise CaptureConfigError(f"{name} must name at least one id (Istio: 1337)")
            for i in ids:
                if not i.isdigit():
                    raise CaptureConfigError(f"{name}: {i!r} is not a numeric id")
        if self.outbound_ip_ranges_exclude.strip() == "*":
            raise CaptureConfigError(
                "outbound_ip_ranges_exclude cannot be '*' (to capture nothing outbound, leave "
                "outbound_ip_ranges_include empty)"
            )
        for name in ("outbound_ip_ranges_include", "outbound_ip_ranges_exclude"):
            value = getattr(self, name)
            if value.strip() != "*":
                for cidr in split(value):
                    _cidr(cidr, name)
        _cidr(self.host_loopback_cidr, "host_loopback_cidr")
        for iface in split(self.exclude_interfaces):
            if not iface or len(iface) > 15 or "/" in iface or " " in iface:
                raise CaptureConfigError(f"exclude_interfaces: {iface!r} is not an interface name")
        return self


def split(value: str) -> list[str]:
    """``istio-iptables``' list splitting: commas, surrounding blanks and empty items dropped."""
    return [v.strip() for v in value.split(",") if v.strip()]


def _port(value: str, name: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = -1
    if not 0 < n < 65536:
        raise CaptureConfigError(f"{name}: {value!r} is not a port number (1-65535)")
    return n


def _cidr(value: str, name: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise CaptureConfigError(
            f"{name}: {value!r} is not an IP range in CIDR form (like 10.0.0.0/8)"
        ) from None


def _v4(value: str, name: str) -> list[str]:
    """The IPv4 ranges of a list, normalised as iptables prints them (10.1.2.3/8 -> 10.0.0.0/8)."""
    out = []
    for item in split(value):
        net = _cidr(item, name)
        if isinstance(net, ipaddress.IPv4Network):
            out.append(str(net))
    return out


def _has_loopback(value: str) -> bool:
    return any(
        ipaddress.ip_network(c, strict=False).network_address.is_loopback
        for c in split(value)
        if c != "*"
    )


def from_annotations(
    annotations: Mapping[str, str], base: CaptureConfig | None = None
) -> CaptureConfig:
    """Settings for a pod with these annotations, on top of ``base`` (default: what Istio's
    injector uses). ``excludeInboundPorts`` adds to 15090,15021,15020, as Istio's template
    does; the other annotations replace the default."""
    cfg = base if base is not None else CaptureConfig.injected()
    changes: dict[str, str] = {}
    for key, field_name in ANNOTATIONS.items():
        if key not in annotations:
            continue
        value = str(annotations[key]).strip()
        if field_name == "inbound_ports_exclude":
            value = ",".join(split(cfg.inbound_ports_exclude) + split(value))
        changes[field_name] = value
    return replace(cfg, **changes).validate()  # type: ignore[arg-type]  # keys come from ANNOTATIONS, all CaptureConfig str fields


def build_rules(cfg: CaptureConfig) -> list[str]:
    """The ``iptables-restore`` lines (``* nat`` ... ``COMMIT``) for ``cfg``; IPv4 only.
    ``interception_mode`` NONE gives no lines (nothing to install)."""
    cfg.validate()
    if cfg.interception_mode == "NONE":
        return []
    out: list[str] = ["* nat"]
    out += [f"-N {c}" for c in CHAINS]
    for iface in split(cfg.exclude_interfaces):
        out.append(f"-A PREROUTING -i {iface} -j RETURN")
        out.append(f"-A OUTPUT -o {iface} -j RETURN")
    out.append(f"-A ISTIO_INBOUND -p tcp --dport {cfg.inbound_tunnel_port} -j RETURN")
    out.append(f"-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports {cfg.proxy_port}")
    out.append(f"-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports {cfg.inbound_capture_port}")

    # inbound
    include = cfg.inbound_ports_include.strip()
    if include:
        out.append("-A PREROUTING -p tcp -j ISTIO_INBOUND")
        if include == "*":
            excluded = split(cfg.inbound_ports_exclude)
            if excluded:
                out.append(
                    f"-A ISTIO_INBOUND -p tcp -m multiport --dports {','.join(excluded)} -j RETURN"
                )
            out.append("-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT")
        else:
            for port in split(include):
                out.append(f"-A ISTIO_INBOUND -p tcp --dport {port} -j ISTIO_IN_REDIRECT")

    # outbound
    out.append("-A OUTPUT -j ISTIO_OUTPUT")
    excluded_out = split(cfg.outbound_ports_exclude)
    if excluded_out:
        ports = ",".join(excluded_out)
        out.append(f"-A ISTIO_OUTPUT -p tcp -m multiport --dports {ports} -j RETURN")
        out.append(f"-A ISTIO_OUTPUT -p udp -m multiport --dports {ports} -j RETURN")
    out.append("-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN")
    loopback = cfg.host_loopback_cidr.strip()  # as given, like istio-iptables (127.0.0.1/8)
    keep_lo = not _has_loopback(cfg.outbound_ip_ranges_include)
    for flag, ids in (("--uid-owner", cfg.proxy_uid), ("--gid-owner", cfg.proxy_gid)):
        for i in split(ids):
            # the sidecar calling its own pod address over lo: back in through inbound capture
            out.append(
                f"-A ISTIO_OUTPUT -o lo ! -d {loopback} -p tcp ! --dport "
                f"{cfg.inbound_tunnel_port} -m owner {flag} {i} -j ISTIO_IN_REDIRECT"
            )
            if keep_lo:  # an app calling itself over lo is not captured
                out.append(f"-A ISTIO_OUTPUT -o lo -m owner ! {flag} {i} -j RETURN")
            out.append(f"-A ISTIO_OUTPUT -m owner {flag} {i} -j RETURN")  # the sidecar's own
    out.append(f"-A ISTIO_OUTPUT -d {loopback} -j RETURN")
    for cidr in _v4(cfg.outbound_ip_ranges_exclude, "outbound_ip_ranges_exclude"):
        out.append(f"-A ISTIO_OUTPUT -d {cidr} -j RETURN")
    for port in split(cfg.outbound_ports_include):
        out.append(f"-A ISTIO_OUTPUT -p tcp --dport {port} -j ISTIO_REDIRECT")
    if cfg.outbound_ip_ranges_include.strip() == "*":
        out.append("-A ISTIO_OUTPUT -j ISTIO_REDIRECT")
    else:
        for cidr in _v4(cfg.outbound_ip_ranges_include, "outbound_ip_ranges_include"):
            out.append(f"-A ISTIO_OUTPUT -d {cidr} -j ISTIO_REDIRECT")
    out.append("COMMIT")
    return out


def render(cfg: CaptureConfig) -> str:
    """``build_rules`` as the text ``iptables-restore --noflush`` reads."""
    lines = build_rules(cfg)
    return "\n".join(lines) + "\n" if lines else ""
