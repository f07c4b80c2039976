"""``diktyo load``: a fortio-like HTTP load client (status-code histogram, latency percentiles)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from collections.abc import Mapping
from typing import Any

from diktyo.api.duration import DurationError, parse_duration
from diktyo.load.client import TargetError, parse_header
from diktyo.load.report import format_text, to_json
from diktyo.load.runner import LoadOptions, LoadResult, ProgressFn, run_load

DEFAULT_REQUESTS = 100
QUIET_LEVELS = ("warning", "error", "critical", "fatal")


def _duration(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return parse_duration(text)
    except DurationError:
        raise argparse.ArgumentTypeError(
            f"invalid duration {text!r}: use seconds or a unit, e.g. 30s, 500ms, 1m"
        ) from None


def _percentiles(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError:
        values = ()
    if not values or not all(0 <= p <= 100 for p in values):
        raise argparse.ArgumentTypeError(
            f"invalid percentiles {text!r}: use numbers between 0 and 100, e.g. 50,90,99.9"
        )
    return values


class ViaError(LookupError):
    """``--via`` names no workload of the running mesh; the message lists the ones there are."""


def proxy_via(state: Mapping[str, Any] | None, name: str) -> str:
    """The outbound proxy URL of the sidecar of ``name`` (a replica like ``sleep-1`` or a workload
    like ``sleep``: its first ready replica) in the state of a running mesh."""
    if state is None:
        raise ViaError(
            f"--via {name}: no mesh is running; start one with 'diktyo up -f mesh.yaml --detach'"
        )
    workloads = [w for w in state.get("workloads", []) if w.get("kind", "workload") == "workload"]
    matches = [w for w in workloads if w.get("name") == name] or [
        w for w in workloads if w.get("workload") == name and w.get("state") == "ready"
    ]
    for w in matches:
        if w.get("netns"):  # transparent capture: run inside its network namespace instead
            return f"netns:{w['netns']}"
        if w.get("outbound_port"):
            return f"http://127.0.0.1:{w['outbound_port']}"
    known = sorted(
        {str(w.get("workload")) for w in workloads} | {str(w.get("name")) for w in workloads}
    )
    raise ViaError(
        f"--via {name}: no ready workload or replica of that name in mesh "
        f"{state.get('name')!r}; known: {', '.join(known) or 'none'} (see 'diktyo status')"
    )


def _run_in_netns(netns: str, args: argparse.Namespace) -> int:
    """``--via`` a replica in transparent mode: the same load, run inside the replica's network
    namespace with no proxy settings (its iptables rules send it through its sidecar), as
    fortio runs inside a pod."""
    import subprocess

    argv = [args.url, "-c", str(args.c), "-qps", str(args.qps), "--timeout", str(args.timeout)]
    argv += ["-o", args.output, "--loglevel", args.loglevel]
    if args.n is not None:
        argv += ["-n", str(args.n)]
    if args.t is not None:
        argv += ["-t", str(args.t)]
    if args.p:
        argv += ["-p", ",".join(str(p) for p in args.p)]
    for h in args.H:
        argv += ["-H", h]
    if args.quiet:
        argv.append("--quiet")
    env = {k: v for k, v in os.environ.items() if k.lower() not in _PROXY_ENV}
    cmd = ["ip", "netns", "exec", netns, sys.executable, "-m", "diktyo.cli.main", "load", *argv]
    try:
        return subprocess.run(cmd, env=env, check=False).returncode
    except FileNotFoundError:
        print("diktyo load: --via a transparent workload needs 'ip' (iproute2)", file=sys.stderr)
        return 2


_PROXY_ENV = frozenset(("http_proxy", "https_proxy", "all_proxy", "no_proxy"))


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "load",
        help="send HTTP load to a URL and print a status-code histogram and latency percentiles",
        description=(
            "A fortio-like load client. Sends GET requests over C keep-alive connections "
            "(as fortio, a connection is closed after an answer other than 2xx or 418 and the "
            "next request opens a new one: 'Sockets used'), through the HTTP proxy in HTTP_PROXY (your sidecar) unless --no-proxy or NO_PROXY "
            "says otherwise, then prints the status codes (Code 200 : 37 (92.5 %)), latency "
            "percentiles and the achieved qps. The run is bounded: -n requests (default 100) "
            "and/or -t duration, whichever ends first. Istio's tasks' fortio commands work, "
            "e.g. 'diktyo load -c 2 -qps 0 -n 20 -loglevel Warning http://httpbin:8000/get'."
        ),
    )
    p.add_argument("url", help="http:// URL, e.g. http://httpbin:8000/get")
    p.add_argument("-c", type=int, default=8, metavar="N", help="connections (default 8)")
    p.add_argument(
        "-n",
        type=int,
        default=None,
        metavar="N",
        help="number of requests, split evenly over the connections as fortio does",
    )
    p.add_argument(
        "-t", type=_duration, default=None, metavar="DURATION", help="run time, e.g. 10s or 1m"
    )
    p.add_argument(
        "-qps",
        "--qps",
        type=float,
        default=0.0,
        metavar="Q",
        help="total requests per second over all connections (default 0: as fast as possible)",
    )
    p.add_argument(
        "-H",
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help="extra request header (repeatable), e.g. -H 'end-user: jason'",
    )
    p.add_argument(
        "-timeout",
        "--timeout",
        type=_duration,
        default=3.0,
        metavar="DURATION",
        help="per-request timeout (default 3s); a timed-out request counts as code -1",
    )
    p.add_argument(
        "-p",
        type=_percentiles,
        default=None,
        metavar="LIST",
        help="percentiles to report (default 50,75,90,99,99.9)",
    )
    p.add_argument("--no-proxy", action="store_true", help="ignore HTTP_PROXY, connect directly")
    p.add_argument(
        "--via",
        metavar="WORKLOAD",
        help=(
            "send from this workload of the running mesh: through its sidecar's outbound port, "
            "like running fortio inside its pod (e.g. --via sleep); in transparent mode the "
            "load runs inside the replica's network namespace (needs root)"
        ),
    )
    p.add_argument("-o", "--output", choices=("text", "json"), default="text", help="result format")
    p.add_argument(
        "-loglevel",
        "--loglevel",
        default="info",
        metavar="LEVEL",
        help="fortio-compatible: Warning or Error hides the progress lines",
    )
    p.add_argument("--quiet", action="store_true", help="hide the progress lines")
    p.set_defaults(func=run)


def _describe(options: LoadOptions) -> str:
    rate = "max qps" if options.qps <= 0 else f"{options.qps:g} qps"
    if options.requests is not None and options.duration is not None:
        bound = f"for {options.requests} calls or {options.duration:g}s, whichever ends first"
    elif options.requests is not None:
        bound = f"for exactly {options.requests} calls"
    else:
        bound = f"for {options.duration:g}s"
    return f"Starting at {rate} with {options.connections} connection(s) {bound}"


async def _run(
    options: LoadOptions, env: Mapping[str, str], progress: ProgressFn | None
) -> LoadResult:
    """Run the load; the first Ctrl-C ends it early and still prints the result."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def interrupted() -> None:
        print("interrupted: finishing requests in flight", file=sys.stderr, flush=True)
        stop.set()
        loop.remove_signal_handler(signal.SIGINT)  # a second Ctrl-C quits at once

    loop.add_signal_handler(signal.SIGINT, interrupted)
    if progress is not None:  # announced once Ctrl-C is handled
        print(_describe(options), file=sys.stderr, flush=True)
    try:
        return await run_load(options, env=env, progress=progress, stop=stop)
    finally:
        loop.remove_signal_handler(signal.SIGINT)


def run(args: argparse.Namespace) -> int:
    if args.c < 1:
        print("diktyo load: -c must be at least 1 connection", file=sys.stderr)
        return 2
    if args.n is not None and args.n < 1:
        print("diktyo load: -n must be at least 1 request", file=sys.stderr)
        return 2
    if args.qps < 0:
        print("diktyo load: -qps must be >= 0 (0 means as fast as possible)", file=sys.stderr)
        return 2
    env: Mapping[str, str] = os.environ
    if args.via:
        from diktyo.platform.state import running_state

        try:
            proxy = proxy_via(running_state(), args.via)
        except ViaError as exc:
            print(f"diktyo load: {exc}", file=sys.stderr)
            return 2
        if proxy.startswith("netns:"):
            return _run_in_netns(proxy.removeprefix("netns:"), args)
        env = {**os.environ, "HTTP_PROXY": proxy, "http_proxy": proxy}
        env.pop("NO_PROXY", None)
        env.pop("no_proxy", None)
        env["NO_PROXY"] = "localhost,127.0.0.1"
    requests = args.n if args.n is not None or args.t is not None else DEFAULT_REQUESTS
    try:
        headers = tuple(parse_header(h) for h in args.H)
        options = LoadOptions(
            url=args.url,
            connections=args.c,
            requests=requests,
            duration=args.t,
            qps=args.qps,
            headers=headers,
            use_proxy=not args.no_proxy or bool(args.via),
            timeout=args.timeout,
            **({"percentiles": args.p} if args.p else {}),
        )
        quiet = args.quiet or args.output == "json" or args.loglevel.lower() in QUIET_LEVELS

        def progress(elapsed: float, done: int) -> None:
            rate = done / elapsed if elapsed > 0 else 0.0
            print(f"{elapsed:6.1f}s: {done} calls, {rate:.1f} qps", file=sys.stderr, flush=True)

        result = asyncio.run(_run(options, env, None if quiet else progress))
    except TargetError as exc:
        print(f"diktyo load: {exc}", file=sys.stderr)
        return 2
    if not quiet and result.proxy:
        print(
            f"(through HTTP proxy {result.proxy}; --no-proxy to connect directly)", file=sys.stderr
        )
    if args.output == "json":
        print(json.dumps(to_json(result), indent=2))
    else:
        sys.stdout.write(format_text(result))
    return 0
