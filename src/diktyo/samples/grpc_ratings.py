"""gRPC sample: a ``ratings.Ratings`` server (v1/v2) and a client, on real grpcio, no protoc.

Messages are JSON objects (grpcio's generic handlers with JSON (de)serializers), so the sample
needs no generated code; on the wire it is ordinary gRPC (HTTP/2, length-prefixed messages,
trailers). Four methods, one per kind of RPC:

``/ratings.Ratings/Get``     unary: ``{"product": 1}`` -> ``{"product", "stars", "version", "pod"}``
``/ratings.Ratings/Watch``   server streaming: ``{"count": n}`` -> n ratings
``/ratings.Ratings/Record``  client streaming: ratings in -> ``{"received": n, "version"}``
``/ratings.Ratings/Chat``    bidirectional: every message echoed with the server's version

``Get`` with metadata ``fail: <code name>`` answers that gRPC status (for retry demos), and
``x-user`` is echoed as ``user``. v1 gives 4 stars, v2 gives 5 (``SERVICE_VERSION``).

Server: ``python -m diktyo.samples.grpc_ratings serve`` (``PORT``, ``SERVICE_VERSION``,
``POD_NAME`` from the environment, as every sample app). Client:
``python -m diktyo.samples.grpc_ratings call [--target HOST:PORT] [--authority ratings:7070]
[--user jason] [--count N]``; inside a local mesh the target defaults to the sidecar from
``HTTP_PROXY`` (an h2c listener) and the authority names the service, so the sidecar routes it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections.abc import Iterator
from concurrent import futures
from typing import Any
from urllib.parse import urlsplit

SERVICE = "ratings.Ratings"


def _enc(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _dec(data: bytes) -> dict[str, Any]:
    out = json.loads(data or b"{}")
    return out if isinstance(out, dict) else {}


def serve(port: int, version: str, pod: str) -> None:
    import grpc

    stars = 5 if version == "v2" else 4

    def get(req: dict[str, Any], ctx: grpc.ServicerContext) -> dict[str, Any]:
        md = dict(ctx.invocation_metadata())
        fail = md.get("fail")
        if isinstance(fail, str) and fail:
            code = getattr(grpc.StatusCode, fail.upper(), grpc.StatusCode.UNKNOWN)
            ctx.abort(code, f"{pod}: failing on request ({fail})")
        ctx.set_trailing_metadata((("x-served-by", pod),))
        return {
            "product": req.get("product", 0),
            "stars": stars,
            "version": version,
            "pod": pod,
            "user": md.get("x-user", ""),
        }

    def watch(req: dict[str, Any], ctx: grpc.ServicerContext) -> Iterator[dict[str, Any]]:
        for i in range(int(req.get("count", 3))):
            yield {"seq": i, "stars": stars, "version": version}

    def record(reqs: Iterator[dict[str, Any]], ctx: grpc.ServicerContext) -> dict[str, Any]:
        n = sum(1 for _ in reqs)
        return {"received": n, "version": version}

    def chat(reqs: Iterator[dict[str, Any]], ctx: grpc.ServicerContext) -> Iterator[dict[str, Any]]:
        for r in reqs:
            yield {**r, "version": version}

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Get": grpc.unary_unary_rpc_method_handler(get, _dec, _enc),
            "Watch": grpc.unary_stream_rpc_method_handler(watch, _dec, _enc),
            "Record": grpc.stream_unary_rpc_method_handler(record, _dec, _enc),
            "Chat": grpc.stream_stream_rpc_method_handler(chat, _dec, _enc),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((handler,))
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    # said once the handlers are in: a SIGTERM sent on seeing this line stops it cleanly
    print(f"{pod} listening on grpc://127.0.0.1:{bound}", flush=True)
    done.wait()
    server.stop(2).wait()


class Client:
    """The four calls, on one grpcio channel."""

    def __init__(self, target: str, authority: str | None = None, timeout: float = 10.0) -> None:
        import grpc

        opts = [("grpc.default_authority", authority)] if authority else []
        self.channel = grpc.insecure_channel(target, options=opts)
        self.timeout = timeout
        ch = self.channel
        self.get = ch.unary_unary(
            f"/{SERVICE}/Get", request_serializer=_enc, response_deserializer=_dec
        )
        self.watch = ch.unary_stream(
            f"/{SERVICE}/Watch", request_serializer=_enc, response_deserializer=_dec
        )
        self.record = ch.stream_unary(
            f"/{SERVICE}/Record", request_serializer=_enc, response_deserializer=_dec
        )
        self.chat = ch.stream_stream(
            f"/{SERVICE}/Chat", request_serializer=_enc, response_deserializer=_dec
        )

    def close(self) -> None:
        self.channel.close()


def _default_target() -> str:
    proxy = os.environ.get("HTTP_PROXY") or os.environ.get("http_proxy") or ""
    if proxy:
        u = urlsplit(proxy)
        return f"{u.hostname}:{u.port}"
    return "127.0.0.1:7070"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m diktyo.samples.grpc_ratings",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("serve", help="run the ratings server (PORT, SERVICE_VERSION, POD_NAME)")
    c = sub.add_parser("call", help="call every method once and print the answers")
    c.add_argument(
        "--target", default=None, help="HOST:PORT (default: the sidecar from HTTP_PROXY)"
    )
    c.add_argument("--authority", default="ratings:7070", help=":authority, names the service")
    c.add_argument("--user", default="", help="x-user metadata (the VirtualService routes on it)")
    c.add_argument("--count", type=int, default=1, help="how many times to call Get")
    a = ap.parse_args(argv)
    if a.cmd == "serve":
        version = os.environ.get("SERVICE_VERSION", "v1")
        pod = os.environ.get("POD_NAME", f"ratings-{version}")
        serve(int(os.environ.get("PORT", "7070")), version, pod)
        return 0
    import grpc

    cl = Client(a.target or _default_target(), a.authority)
    md = (("x-user", a.user),) if a.user else ()
    try:
        for i in range(a.count):
            print("Get", cl.get({"product": i}, metadata=md, timeout=cl.timeout))
        print("Watch", list(cl.watch({"count": 3}, metadata=md, timeout=cl.timeout)))
        print(
            "Record", cl.record(iter([{"stars": 4}, {"stars": 5}]), metadata=md, timeout=cl.timeout)
        )
        print(
            "Chat",
            list(cl.chat(iter([{"say": "hi"}, {"say": "bye"}]), metadata=md, timeout=cl.timeout)),
        )
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    finally:
        cl.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
