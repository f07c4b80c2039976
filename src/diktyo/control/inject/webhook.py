"""The sidecar injection admission webhook: AdmissionReview (admission.k8s.io/v1) in, JSON Patch out.

``review_response(review, config)`` is the pure core; ``WebhookServer`` serves it over TLS on
``POST /inject`` (aiohttp), plus ``GET /ready``. A malformed review gets ``400`` and a
message saying what is wrong; it never crashes the server. Run it in the control-plane pod::

    python -m diktyo.control.inject.webhook --cert tls.crt --key tls.key --port 15017
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import signal
import ssl
import sys
from dataclasses import dataclass, field, replace
from typing import Any

from aiohttp import web

from diktyo.control.inject.config import DEFAULT_CONFIG, InjectConfig
from diktyo.control.inject.patch import json_patch
from diktyo.control.inject.pod import InjectionError, inject_pod, injection_required, pod_problem

log = logging.getLogger(__name__)

API_VERSIONS = ("admission.k8s.io/v1", "admission.k8s.io/v1beta1")
MAX_BODY = 8 * 1024 * 1024  # the API server's request limit is ~3 MiB per object


class ReviewError(ValueError):
    """The AdmissionReview is malformed; the message says what is wrong."""


@dataclass(slots=True)
class WebhookStats:
    """Counters (exposed on ``GET /stats``)."""

    reviews: int = 0
    injected: int = 0
    skipped: int = 0
    malformed: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ReviewError(message)


def review_response(
    review: Any, config: InjectConfig = DEFAULT_CONFIG, stats: WebhookStats | None = None
) -> dict[str, Any]:
    """The AdmissionReview answer for a review; raises ReviewError when it is malformed."""
    _require(isinstance(review, dict), "body must be a JSON object (an AdmissionReview)")
    _require(
        review.get("kind") == "AdmissionReview",
        f"kind must be AdmissionReview, got {review.get('kind')!r}",
    )
    api_version = review.get("apiVersion")
    _require(
        api_version in API_VERSIONS, f"apiVersion must be admission.k8s.io/v1, got {api_version!r}"
    )
    request = review.get("request")
    _require(isinstance(request, dict), "request is missing: the API server always sends one")
    uid = request.get("uid")
    _require(isinstance(uid, str) and bool(uid), "request.uid is missing or not a string")
    response: dict[str, Any] = {"uid": uid, "allowed": True}
    answer = {"apiVersion": api_version, "kind": "AdmissionReview", "response": response}
    kind = request.get("kind") or {}
    _require(isinstance(kind, dict), "request.kind must be a GroupVersionKind object")
    if (
        kind.get("kind") != "Pod"
        or kind.get("group", "") != ""
        or request.get("operation", "CREATE") != "CREATE"
    ):
        _count(stats, False, "not a pod creation")
        return answer
    pod = request.get("object")
    _require(isinstance(pod, dict), "request.object must be the Pod being created")
    problem = pod_problem(pod)
    _require(problem is None, f"request.object: {problem}")
    namespace = (
        request.get("namespace") or (pod.get("metadata") or {}).get("namespace") or "default"
    )
    _require(isinstance(namespace, str), "request.namespace must be a string")
    required, reason = injection_required(pod, config, namespace)
    if not required:
        _count(stats, False, reason)
        return answer
    try:
        mutated = inject_pod(pod, config, namespace=namespace)
    except InjectionError as exc:  # Istio denies the pod with the reason
        _count(stats, False, "invalid annotation")
        response["allowed"] = False
        response["status"] = {"code": 400, "message": f"diktyo sidecar injection: {exc}"}
        return answer
    ops = json_patch(pod, mutated)
    _count(stats, True, reason)
    response["patchType"] = "JSONPatch"
    response["patch"] = base64.b64encode(json.dumps(ops, separators=(",", ":")).encode()).decode()
    return answer


def _count(stats: WebhookStats | None, injected: bool, reason: str) -> None:
    if stats is None:
        return
    stats.reviews += 1
    if injected:
        stats.injected += 1
    else:
        stats.skipped += 1
    stats.reasons[reason] = stats.reasons.get(reason, 0) + 1


class WebhookServer:
    """aiohttp server for ``POST /inject`` over TLS (cert and key from files)."""

    def __init__(
        self,
        config: InjectConfig = DEFAULT_CONFIG,
        *,
        cert_file: str | None = None,
        key_file: str | None = None,
    ) -> None:
        self.config = config
        self.stats = WebhookStats()
        self._ssl: ssl.SSLContext | None = None
        if cert_file and key_file:
            self._ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self._ssl.minimum_version = ssl.TLSVersion.TLSv1_2
            self._ssl.load_cert_chain(cert_file, key_file)
        self._runner: web.AppRunner | None = None
        self.port = 0

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_post("/inject", self._inject)
        app.router.add_get("/ready", self._ready)
        app.router.add_get("/stats", self._stats)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, ssl_context=self._ssl)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _inject(self, request: web.Request) -> web.Response:
        try:
            raw = await request.read()
            try:
                review = json.loads(raw)
            except ValueError as exc:
                raise ReviewError(f"body is not JSON ({exc}); send an AdmissionReview") from None
            answer = review_response(review, self.config, self.stats)
        except ReviewError as exc:
            self.stats.malformed += 1
            log.warning("malformed AdmissionReview from %s: %s", request.remote, exc)
            return web.Response(status=400, text=f"malformed AdmissionReview: {exc}\n")
        except web.HTTPException:
            raise
        except Exception:  # a bug in injection must not take the webhook down
            self.stats.malformed += 1
            log.exception("injection failed")
            return web.Response(status=500, text="injection failed: see the webhook's log\n")
        return web.json_response(answer)

    async def _ready(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _stats(self, request: web.Request) -> web.Response:
        s = self.stats
        return web.json_response(
            {
                "reviews": s.reviews,
                "injected": s.injected,
                "skipped": s.skipped,
                "malformed": s.malformed,
                "reasons": s.reasons,
            }
        )


_ARG_FIELDS = {
    "image": "image",
    "control_plane": "control_plane",
    "trust_domain": "trust_domain",
    "log_level": "log_level",
    "tracing_sampling": "tracing_sampling",
    "proxy_concurrency": "concurrency",
    "proxy_cpu": "cpu_request",
    "proxy_memory": "memory_request",
    "proxy_cpu_limit": "cpu_limit",
    "proxy_memory_limit": "memory_limit",
}


def config_from_args(args: argparse.Namespace, base: InjectConfig = DEFAULT_CONFIG) -> InjectConfig:
    changes = {
        f: getattr(args, a) for a, f in _ARG_FIELDS.items() if getattr(args, a, None) is not None
    }
    return replace(base, **changes)


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", help=f"sidecar image (default {DEFAULT_CONFIG.image})")
    p.add_argument(
        "--control-plane", help=f"control plane URL (default {DEFAULT_CONFIG.control_plane})"
    )
    p.add_argument("--trust-domain", help="SPIFFE trust domain (default cluster.local)")
    p.add_argument("--log-level", help="sidecar log level (debug|info|warning|error)")
    p.add_argument("--tracing-sampling", type=float, help="percent of requests traced (0-100)")
    p.add_argument(
        "--proxy-concurrency", type=int, choices=range(65), metavar="N",
        help="worker processes per sidecar (Istio's meshConfig.defaultConfig.concurrency; 0 = "
        "one per core; default: the sidecar's, 1); a pod's proxy.istio.io/config annotation "
        "wins",
    )  # fmt: skip
    p.add_argument(
        "--proxy-cpu", help=f"sidecar CPU request (default {DEFAULT_CONFIG.cpu_request})"
    )
    p.add_argument(
        "--proxy-memory", help=f"sidecar memory request (default {DEFAULT_CONFIG.memory_request})"
    )
    p.add_argument(
        "--proxy-cpu-limit", help=f"sidecar CPU limit (default {DEFAULT_CONFIG.cpu_limit})"
    )
    p.add_argument(
        "--proxy-memory-limit", help=f"sidecar memory limit (default {DEFAULT_CONFIG.memory_limit})"
    )


async def _serve(args: argparse.Namespace) -> int:
    try:
        server = WebhookServer(config_from_args(args), cert_file=args.cert, key_file=args.key)
    except (OSError, ssl.SSLError) as exc:
        print(f"webhook: cannot load the TLS certificate {args.cert} / key {args.key}: {exc}; "
              "mount the diktyo-webhook-tls Secret there", file=sys.stderr)
        return 1
    try:
        port = await server.start(args.host, args.port)
    except OSError as exc:
        print(f"webhook: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(
        f"injection webhook serving on {'https' if args.cert else 'http'}://{args.host}:{port}/inject",
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m diktyo.control.inject.webhook",
        description="Serve diktyo's sidecar injection webhook (POST /inject).",
    )
    p.add_argument("--cert", help="TLS certificate file (PEM); the API server only calls HTTPS")
    p.add_argument("--key", help="TLS private key file (PEM)")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=15017)
    add_config_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if bool(args.cert) != bool(args.key):
        print(
            "webhook: give both --cert and --key (or neither, for plain HTTP in tests)",
            file=sys.stderr,
        )
        return 2
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    return asyncio.run(_serve(args))


if __name__ == "__main__":
    sys.exit(main())
