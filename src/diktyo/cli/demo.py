"""``diktyo demo``: Bookinfo on a local mesh with Istio's default routing, a little traffic, URLs."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import diktyo

# Used when diktyo is installed without its repository's samples/ folder.
_FALLBACK_CONFIG = """
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: bookinfo-gateway}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 8080, name: http, protocol: HTTP}
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: bookinfo}
spec:
  hosts: ["*"]
  gateways: [bookinfo-gateway]
  http:
  - match:
    - uri: {exact: /productpage}
    - uri: {prefix: /static}
    - uri: {exact: /login}
    - uri: {exact: /logout}
    - uri: {prefix: /api/v1/products}
    route:
    - destination: {host: productpage, port: {number: 9080}}
"""
_DEFAULT_FILES = (
    "bookinfo-gateway.yaml",
    "destination-rule-all.yaml",
    "virtual-service-all-v1.yaml",
)


def find_bookinfo() -> Path | None:
    """``samples/bookinfo`` of the repository (editable install) or of the current folder."""
    candidates = [
        Path(diktyo.__file__).resolve().parents[2] / "samples" / "bookinfo",
        Path.cwd() / "samples" / "bookinfo",
    ]
    for c in candidates:
        if (c / "mesh.yaml").is_file():
            return c
    return None


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "demo",
        help="run Bookinfo on a local mesh (start here)",
        description=(
            "Start Bookinfo (productpage, details, reviews v1/v2/v3, ratings, an ingress gateway) on a "
            "local mesh, apply Istio's default routing (gateway, destination rules, all traffic to v1), "
            "send a little traffic and print the product page and dashboard URLs. Runs until Ctrl-C."
        ),
    )
    p.add_argument(
        "--port",
        type=int,
        default=8080,
        help="ingress gateway port on 127.0.0.1 (default 8080, 0 = pick)",
    )
    p.add_argument(
        "--requests", type=int, default=10, help="requests to send once ready (default 10)"
    )
    p.add_argument(
        "--rate",
        type=float,
        default=1.0,
        help="keep sending this many requests per second until Ctrl-C, so the dashboard stays "
        "live (default 1, 0 = none)",
    )
    p.add_argument(
        "--capture",
        choices=["proxy", "transparent", "auto"],
        help="proxy (default: the apps use HTTP_PROXY), transparent (each replica in its own "
        "network namespace, the apps run without proxy settings; needs root) or auto",
    )
    p.add_argument("--exit-after-traffic", action="store_true", help=argparse.SUPPRESS)  # for tests
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from diktyo.platform.harness import with_gateway_host_port
    from diktyo.platform.mesh import load_mesh
    from diktyo.platform.ports import port_in_use
    from diktyo.platform.run import already_running_message, serve_mesh

    busy = already_running_message()
    if busy:
        print(f"error: {busy}", file=sys.stderr)
        return 1
    root = find_bookinfo()
    if root is None:
        print(
            "error: samples/bookinfo/mesh.yaml not found; run 'diktyo demo' from the diktyo repository",
            file=sys.stderr,
        )
        return 1
    if args.port and port_in_use(args.port):
        print(
            f"error: port {args.port} is in use; pick another with 'diktyo demo --port 8081' (0 = any free port)",
            file=sys.stderr,
        )
        return 1
    spec = with_gateway_host_port(load_mesh(root / "mesh.yaml"), args.port)
    if args.capture:
        spec = spec.model_copy(update={"capture": args.capture})
    texts: list[tuple[str, str]] = []
    for name in _DEFAULT_FILES:
        f = root / "networking" / name
        if f.is_file():
            texts.append((f.read_text(), str(f)))
    if not texts:
        texts = [(_FALLBACK_CONFIG, "<demo default config>")]

    async def after_start(mesh) -> None:  # type: ignore[no-untyped-def]
        for text, source in texts:
            keys, errors = mesh.cp.store.apply_text(text, source)
            for err in errors:
                print(err, file=sys.stderr)
            print(f"applied {source} ({len(keys)} resources)", flush=True)
        await mesh.cp.sync(10.0)
        url = mesh.gateway_url() + "/productpage"
        codes = await asyncio.to_thread(_traffic, url, args.requests)
        summary = ", ".join(f"{k}: {v}" for k, v in sorted(codes.items()))
        print(f"sent {args.requests} requests to {url} ({summary})")
        print()
        print(f"  product page: {url}")
        print(f"  dashboard:    {mesh.url}/?token={mesh.cp.admin_token}")
        print("  try Istio's tasks from another terminal, e.g.")
        print(f"    diktyo apply -f {root / 'networking' / 'virtual-service-reviews-test-v2.yaml'}")
        print("    diktyo proxy-status ; diktyo proxy-config productpage-v1-1 routes")
        if args.rate > 0 and not args.exit_after_traffic:
            import threading

            threading.Thread(
                target=_trickle, args=(url, args.rate), name="demo-traffic", daemon=True
            ).start()
            print(f"  sending {args.rate:g} request(s)/s to the product page (--rate 0 stops it)")
        print("  Ctrl-C stops everything", flush=True)
        if args.exit_after_traffic:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGTERM)

    try:
        import uvloop

        return uvloop.run(serve_mesh(spec, after_start=after_start))
    except ImportError:  # pragma: no cover
        return asyncio.run(serve_mesh(spec, after_start=after_start))


def _trickle(url: str, rate: float) -> None:
    """Background traffic for the dashboard: ``rate`` requests per second, forever (daemon)."""
    import time

    period = 1.0 / rate
    next_at = time.monotonic()
    while True:
        _traffic(url, 1)
        next_at += period
        time.sleep(max(0.0, next_at - time.monotonic()))


def _traffic(url: str, n: int) -> dict[str, int]:
    import urllib.error
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    codes: dict[str, int] = {}
    for _ in range(n):
        try:
            with opener.open(url, timeout=10) as r:
                key = str(r.status)
                r.read()
        except urllib.error.HTTPError as exc:
            key = str(exc.code)
        except OSError as exc:
            key = type(exc).__name__
        codes[key] = codes.get(key, 0) + 1
    return codes
