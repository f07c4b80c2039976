"""``diktyo stat``: golden signals per workload or service, like ``linkerd viz stat``.

Reads the running control plane's embedded metric store (``/telemetry/api/metrics/edges``,
raw per-edge sums with histogram buckets) and its replica list (``/v1/workloads``). Inbound
stats of a workload come from its own sidecar (``reporter="destination"``), as in Istio's
dashboards; services called only by meshed clients without a sidecar of their own (external
hosts) fall back to the callers' view (``reporter="source"``). Percentiles are computed here
from the summed buckets with Prometheus' ``histogram_quantile`` rule.

The aggregation and the table are pure functions (:func:`build_rows`, :func:`format_table`);
:func:`run` only fetches.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from diktyo.cli._common import add_cp_arg, call, cp_url, table
from diktyo.telemetry.store import histogram_quantile

HEADERS = ["NAME", "MESHED", "SUCCESS", "RPS", "LATENCY_P50", "LATENCY_P95", "LATENCY_P99"]
WIDE_HEADERS = ["NAMESPACE", *HEADERS, "REQUESTS", "TCP_OPENED", "TCP_READ", "TCP_WRITE"]
_WINDOW = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(s|m|h)?$")
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


# --------------------------------------------------------------------------- pure core


def parse_window(text: str) -> float:
    """``30s``, ``1m``, ``1h`` or plain seconds -> seconds (between 1 s and 1 h)."""
    m = _WINDOW.match(text.strip())
    if not m:
        raise ValueError(f"--window {text!r} is not a duration like 30s, 1m or 1h")
    seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if not 1.0 <= seconds <= 3600.0:
        raise ValueError(f"--window {text!r} must be between 1s and 1h (the store keeps 1 h)")
    return seconds


@dataclass(frozen=True, slots=True)
class Target:
    """What to show: ``kind`` "deploy" or "svc", and one ``name`` or all (None)."""

    kind: str = "deploy"
    name: str | None = None


def parse_target(text: str | None) -> Target:
    """``None``/``deploy``/``svc``, ``deploy/NAME``, ``svc/NAME`` or a bare workload ``NAME``."""
    if not text:
        return Target()
    aliases = {"deploy": "deploy", "deployment": "deploy", "deployments": "deploy",
               "workload": "deploy", "workloads": "deploy", "svc": "svc", "service": "svc",
               "services": "svc", "po": "deploy"}  # fmt: skip
    if text in aliases:
        return Target(aliases[text])
    if "/" in text:
        kind, name = text.split("/", 1)
        if kind not in aliases or not name:
            raise ValueError(
                f"{text!r}: use WORKLOAD, deploy/WORKLOAD or svc/SERVICE (e.g. svc/reviews)"
            )
        return Target(aliases[kind], name)
    return Target("deploy", text)


def short_service(fqdn: str) -> str:
    return fqdn.split(".", 1)[0] if fqdn.endswith(".svc.cluster.local") else fqdn


@dataclass(slots=True)
class StatRow:
    """Summed inbound traffic of one workload or service over ``window`` seconds."""

    name: str
    namespace: str = "-"
    meshed: str = "-"  # "ready/total" replicas, "-" when unknown
    window: float = 60.0
    requests: float = 0.0
    errors: float = 0.0
    buckets: dict[float, float] = field(default_factory=dict)
    tcp_opened: float = 0.0
    tcp_sent: float = 0.0
    tcp_received: float = 0.0

    def add(self, edge: Mapping[str, Any]) -> None:
        self.requests += float(edge.get("requests", 0.0))
        self.errors += float(edge.get("errors", 0.0))
        for le, count in edge.get("durationBuckets", []):
            key = math.inf if le in ("+Inf", "inf") else float(le)
            self.buckets[key] = self.buckets.get(key, 0.0) + float(count)
        self.tcp_opened += float(edge.get("tcpOpened", 0.0))
        self.tcp_sent += float(edge.get("tcpSent", 0.0))
        self.tcp_received += float(edge.get("tcpReceived", 0.0))

    @property
    def success(self) -> float | None:
        return (1.0 - self.errors / self.requests) if self.requests > 0 else None

    @property
    def rps(self) -> float | None:
        return self.requests / self.window if self.requests > 0 else None

    def quantile(self, q: float) -> float | None:
        return histogram_quantile(q, self.buckets) if self.requests > 0 else None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "namespace": self.namespace,
            "meshed": self.meshed,
            "window": self.window,
            "requests": self.requests,
            "success": self.success,
            "rps": self.rps,
            "latencyP50Ms": self.quantile(0.5),
            "latencyP95Ms": self.quantile(0.95),
            "latencyP99Ms": self.quantile(0.99),
            "tcpOpened": self.tcp_opened,
            "tcpReadBps": self.tcp_received / self.window,
            "tcpWriteBps": self.tcp_sent / self.window,
        }


def _replicas(workloads: Iterable[Mapping[str, Any]]) -> dict[str, tuple[str, int, int]]:
    """workload -> (namespace, ready, total) from ``/v1/workloads`` replicas."""
    out: dict[str, tuple[str, int, int]] = {}
    for r in workloads:
        name = str(r.get("workload") or r.get("name") or "")
        if not name:
            continue
        ns, ready, total = out.get(name, (str(r.get("namespace") or "default"), 0, 0))
        out[name] = (ns, ready + (r.get("state") == "ready"), total + 1)
    return out


def build_rows(
    target: Target,
    edges: Sequence[Mapping[str, Any]],
    workloads: Sequence[Mapping[str, Any]],
    window: float,
    from_workload: str | None = None,
) -> list[StatRow]:
    """Rows for ``target`` from ``/api/metrics/edges`` edges (any reporter) and replicas.

    Raises ``LookupError`` when ``target`` names a workload or service nobody knows.
    """
    if from_workload is not None:
        edges = [e for e in edges if e.get("source_workload") == from_workload]
    inbound = [e for e in edges if e.get("reporter") == "destination"]
    rows: dict[str, StatRow] = {}
    if target.kind == "deploy":
        for name, (ns, ready, total) in _replicas(workloads).items():
            rows[name] = StatRow(name, ns, f"{ready}/{total}", window)
        for e in inbound:
            wl = str(e.get("destination_workload", "unknown"))
            if wl == "unknown":
                continue
            row = rows.get(wl)
            if row is None:
                svc = str(e.get("destination_service", ""))
                parts = svc.split(".")
                ns = parts[1] if svc.endswith(".svc.cluster.local") and len(parts) > 2 else "-"
                row = rows[wl] = StatRow(wl, ns, "-", window)
            row.add(e)
        if target.name is not None:
            if target.name not in rows:
                known = ", ".join(sorted(rows)) or "none"
                raise LookupError(f"no workload {target.name!r} in this mesh (known: {known})")
            rows = {target.name: rows[target.name]}
    else:
        with_inbound = {str(e.get("destination_service")) for e in inbound}
        behind: dict[str, set[str]] = {}  # service -> workloads that answered it
        for e in edges:
            svc = str(e.get("destination_service", "unknown"))
            if svc == "unknown":
                continue
            # a service's own sidecars' view when it has one, else its callers' view
            wanted = "destination" if svc in with_inbound else "source"
            if e.get("reporter") != wanted:
                continue
            row = rows.get(svc)
            if row is None:
                parts = svc.split(".")
                ns = parts[1] if svc.endswith(".svc.cluster.local") and len(parts) > 2 else "-"
                row = rows[svc] = StatRow(short_service(svc), ns, "-", window)
            row.add(e)
            behind.setdefault(svc, set()).add(str(e.get("destination_workload", "unknown")))
        replicas = _replicas(workloads)
        for svc, row in rows.items():
            counts = [replicas[w] for w in sorted(behind.get(svc, ())) if w in replicas]
            if counts:
                row.meshed = f"{sum(c[1] for c in counts)}/{sum(c[2] for c in counts)}"
        if target.name is not None:
            chosen = {k: r for k, r in rows.items() if target.name in (k, r.name)}
            if not chosen:
                known = ", ".join(sorted(r.name for r in rows.values())) or "none"
                raise LookupError(
                    f"no traffic to a service {target.name!r} in the last {window:g}s "
                    f"(services with traffic: {known})"
                )
            rows = chosen
    return sorted(rows.values(), key=lambda r: (r.namespace, r.name))


def _ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.1f}ms" if v < 10 else f"{v:.0f}ms"


def _bps(v: float) -> str:
    for unit, size in (("MB/s", 1e6), ("kB/s", 1e3)):
        if v >= size:
            return f"{v / size:.1f}{unit}"
    return f"{v:.0f}B/s"


def format_row(row: StatRow, wide: bool = False) -> list[str]:
    success, rps = row.success, row.rps
    cells = [
        row.name,
        row.meshed,
        "-" if success is None else f"{success * 100:.2f}%",
        "-" if rps is None else f"{rps:.1f}rps" if rps >= 0.1 else f"{rps:.2f}rps",
        _ms(row.quantile(0.5)),
        _ms(row.quantile(0.95)),
        _ms(row.quantile(0.99)),
    ]
    if not wide:
        return cells
    has_tcp = row.tcp_opened or row.tcp_sent or row.tcp_received
    return [
        row.namespace,
        *cells,
        "-" if not row.requests else f"{row.requests:.0f}",
        f"{row.tcp_opened:.0f}" if has_tcp else "-",
        _bps(row.tcp_received / row.window) if has_tcp else "-",
        _bps(row.tcp_sent / row.window) if has_tcp else "-",
    ]


def format_table(rows: Sequence[StatRow], wide: bool = False) -> str:
    """The ``linkerd viz stat``-style table; "-" where a row had no traffic."""
    return table([format_row(r, wide) for r in rows], WIDE_HEADERS if wide else HEADERS)


# --------------------------------------------------------------------------- command


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "stat",
        help="success rate, RPS and latency per workload or service",
        description=(
            "Golden signals of the running mesh, like 'linkerd viz stat': per workload "
            "(default; inbound traffic as its own sidecar saw it) or per service (svc, svc/NAME): "
            "replicas ready, success rate, requests per second and p50/p95/p99 latency over "
            "--window. Rows without traffic show '-'. Data: the control plane's metric store."
        ),
        epilog="Examples: diktyo stat | diktyo stat deploy/reviews-v2 | diktyo stat svc "
        "--window 5m | diktyo stat reviews-v1 --from productpage-v1 -o json",
    )
    p.add_argument(
        "target",
        nargs="?",
        metavar="WORKLOAD|deploy/NAME|svc/NAME",
        help="one workload or service (default: every workload; 'svc' for every service)",
    )
    p.add_argument("--window", "-t", default="1m", help="time window: 30s, 1m (default), 1h")
    p.add_argument("-o", "--output", choices=["table", "wide", "json"], default="table")
    p.add_argument(
        "--from",
        dest="from_workload",
        metavar="WORKLOAD",
        help="only requests sent by this workload (e.g. productpage-v1 or deploy/productpage-v1)",
    )
    add_cp_arg(p)
    p.set_defaults(func=run)


def fetch(base: str, window: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]], float]:
    """(edges, replicas, window) from a control plane. Raises ConnectionError / LookupError."""
    query = urllib.parse.urlencode({"window": f"{window:g}"})
    status, body = call("GET", f"{base}/telemetry/api/metrics/edges?{query}")
    if status == 404:
        raise LookupError(
            f"the control plane at {base} has no metric store API (/telemetry/api/metrics/edges): "
            "it runs without observability or is an older diktyo; restart it with this version"
        )
    if status != 200 or not isinstance(body, dict):
        raise LookupError(f"the control plane answered HTTP {status}: {body!r:.300}")
    wstatus, wbody = call("GET", f"{base}/v1/workloads")
    workloads = wbody.get("workloads", []) if wstatus == 200 and isinstance(wbody, dict) else []
    return list(body.get("edges", [])), list(workloads), float(body.get("window", window))


def run(args: argparse.Namespace) -> int:
    try:
        window = parse_window(args.window)
        target = parse_target(args.target)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from_wl = args.from_workload
    if from_wl and "/" in from_wl:
        from_wl = from_wl.split("/", 1)[1]
    base = cp_url(args)
    if base is None:
        return 1
    try:
        edges, workloads, span = fetch(base, window)
        rows = build_rows(target, edges, workloads, span, from_wl)
    except (ConnectionError, LookupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.output == "json":
        print(json.dumps([r.to_json() for r in rows], indent=2))
    elif not rows:
        print(
            "no workloads and no traffic yet (the control plane scrapes sidecars every 5 s; "
            "send some requests and retry)"
        )
    else:
        print(format_table(rows, wide=args.output == "wide"))
    return 0
