"""The snapshot's one wire format: JSON, decoded with full type validation."""

from __future__ import annotations

import msgspec

from diktyo.snapshot.model import Snapshot

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Snapshot)


class SnapshotError(ValueError):
    """A snapshot that cannot be decoded or fails validation; it is rejected whole."""


def encode(snapshot: Snapshot) -> bytes:
    return _encoder.encode(snapshot)


def decode(data: bytes | str) -> Snapshot:
    try:
        snap = _decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise SnapshotError(f"invalid snapshot: {exc}") from None
    except msgspec.DecodeError as exc:
        raise SnapshotError(f"malformed snapshot JSON: {exc}") from None
    return _valid(snap)


def to_builtins(snapshot: Snapshot) -> object:
    return msgspec.to_builtins(snapshot)


def from_builtins(obj: object) -> Snapshot:
    """Build a snapshot from plain dicts/lists (tests and YAML fixtures)."""
    try:
        snap = msgspec.convert(obj, Snapshot)
    except msgspec.ValidationError as exc:
        raise SnapshotError(f"invalid snapshot: {exc}") from None
    return _valid(snap)


def _valid(snap: Snapshot) -> Snapshot:
    """``snap`` if ``validate`` finds nothing, else ``SnapshotError`` naming every problem."""
    problems = validate(snap)
    if problems:
        raise SnapshotError("invalid snapshot: " + "; ".join(problems))
    return snap


def validate(snap: Snapshot) -> list[str]:
    """Cross-reference checks the type system cannot express."""
    problems: list[str] = []
    clusters = {c.name for c in snap.clusters}
    tables = {t.name for t in snap.route_tables}
    if len(clusters) != len(snap.clusters):
        problems.append("duplicate cluster names")
    for lst in snap.listeners:
        if lst.direction in ("outbound", "gateway") and lst.route_table not in tables:
            problems.append(f"listener {lst.name!r}: unknown route table {lst.route_table!r}")
        if lst.direction in ("inbound", "tcp") and lst.cluster not in clusters:
            problems.append(f"listener {lst.name!r}: unknown cluster {lst.cluster!r}")
        for r in lst.tcp_routes:
            for wc in r.clusters:
                if wc.cluster not in clusters:
                    problems.append(f"listener {lst.name!r}: tcp route to unknown cluster {wc.cluster!r}")
    problems += _capture_problems(snap, clusters)
    for table in snap.route_tables:
        for vh in table.virtual_hosts:
            for route in vh.routes:
                targets = [wc.cluster for wc in route.clusters] + [m.cluster for m in route.mirrors]
                for name in targets:
                    if name not in clusters:
                        problems.append(
                            f"route table {table.name!r} host {vh.name!r} route {route.name!r}: "
                            f"unknown cluster {name!r}"
                        )
                if not route.clusters and route.redirect is None and route.direct_response is None:
                    problems.append(f"route {route.name!r} in {vh.name!r} has no action")
    return problems


def _capture_problems(snap: Snapshot, clusters: set[str]) -> list[str]:
    """Capture config: clusters exist, addresses and subnets parse."""
    cap = snap.capture
    if cap is None:
        return []
    import ipaddress  # only with capture config: ~0.3 MiB an idle sidecar need not pay (issue 11)

    out: list[str] = []
    for s in cap.services:
        where = f"capture service {s.host}:{s.port} ({s.address})"
        try:
            ipaddress.ip_network(s.address, strict=False)
        except ValueError as exc:
            out.append(f"{where}: address: {exc}")
        names = [s.cluster] + [wc.cluster for r in s.tcp_routes for wc in r.clusters]
        out += [f"{where}: unknown cluster {n!r}" for n in names if n and n not in clusters]
        for r in s.tcp_routes:
            for m in r.matches:
                for sub in m.destination_subnets:
                    try:
                        ipaddress.ip_network(sub, strict=False)
                    except ValueError as exc:
                        out.append(f"{where}: destinationSubnets: {exc}")
    for i in cap.inbound:
        if i.cluster and i.cluster not in clusters:
            out.append(f"capture inbound port {i.port}: unknown cluster {i.cluster!r}")
    return out
