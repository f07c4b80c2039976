"""An asyncio client for etcd's v3 API through its JSON gRPC gateway (``POST /v3/...``).

Theory of operation
-------------------
etcd (3.4+) serves its gRPC API as JSON on the client port: keys and values are base64,
64-bit integers are strings, ``false``/``0`` fields are left out. ``EtcdClient`` sends each
call to the endpoint that answered last and moves to the next one on a connection error
or a timeout, so one dead member is invisible to callers. A call that no endpoint answers
in time raises ``EtcdUnavailable`` with every endpoint's reason, which is what a caller
shows when the cluster has lost its quorum (a write then waits for a leader that never
comes). ``watch()`` is an async iterator of event batches over one streaming request; it
reconnects from the last seen revision, so no event is lost across a member's death.
Why not a gRPC client library: see ``docs/decisions.md`` ("etcd store").
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

log = logging.getLogger(__name__)


class EtcdError(Exception):
    """etcd answered with an error (``message`` is etcd's own text)."""


class EtcdUnavailable(EtcdError):
    """No etcd endpoint answered in time (members down, or no quorum)."""


def b64(data: str | bytes) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text) if text else b""


def prefix_end(prefix: str) -> str:
    """The ``range_end`` that selects every key starting with ``prefix``."""
    raw = bytearray(prefix.encode())
    raw[-1] += 1
    return b64(bytes(raw))


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: str
    value: bytes
    mod_revision: int
    create_revision: int
    lease: int = 0

    @classmethod
    def from_json(cls, kv: dict[str, Any]) -> KeyValue:
        return cls(
            unb64(kv.get("key", "")).decode(),
            unb64(kv.get("value", "")),
            int(kv.get("mod_revision", 0)),
            int(kv.get("create_revision", 0)),
            int(kv.get("lease", 0)),
        )


@dataclass(frozen=True, slots=True)
class Event:
    type: str  # PUT | DELETE
    kv: KeyValue


@dataclass(frozen=True, slots=True)
class TxnResult:
    succeeded: bool
    revision: int
    responses: list[dict[str, Any]]


def put_op(key: str, value: bytes | str, lease: int = 0) -> dict[str, Any]:
    req: dict[str, Any] = {"key": b64(key), "value": b64(value)}
    if lease:
        req["lease"] = str(lease)
    return {"request_put": req}


def delete_op(key: str) -> dict[str, Any]:
    return {"request_delete_range": {"key": b64(key)}}


def range_op(key: str) -> dict[str, Any]:
    return {"request_range": {"key": b64(key)}}


def mod_equals(key: str, revision: int) -> dict[str, Any]:
    """Compare: ``key`` was last written at ``revision`` (0: the key does not exist)."""
    return {"key": b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": str(revision)}


def created_equals(key: str, revision: int) -> dict[str, Any]:
    return {
        "key": b64(key),
        "target": "CREATE",
        "result": "EQUAL",
        "create_revision": str(revision),
    }


class EtcdClient:
    """``EtcdClient(["http://127.0.0.1:2379", ...])``; ``await close()`` when done."""

    def __init__(self, endpoints: Sequence[str], *, timeout: float = 3.0) -> None:
        if not endpoints:
            raise ValueError("at least one etcd endpoint is needed")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.timeout = timeout
        self._current = 0
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def endpoint(self) -> str:
        return self.endpoints[self._current]

    async def call(self, path: str, body: dict[str, Any], timeout: float | None = None) -> Any:
        """POST ``body`` to ``/v3/<path>`` on a live endpoint; the decoded JSON answer."""
        limit = self.timeout if timeout is None else timeout
        reasons: list[str] = []
        n = len(self.endpoints)
        for i in range(n):
            index = (self._current + i) % n
            url = self.endpoints[index]
            try:
                async with asyncio.timeout(limit):
                    async with self._http().post(f"{url}/v3/{path}", json=body) as resp:
                        text = await resp.text()
            except TimeoutError:  # before OSError, its base class
                reasons.append(f"{url}: no answer within {limit:g} s")
                continue
            except (aiohttp.ClientError, OSError) as exc:
                reasons.append(f"{url}: {type(exc).__name__}: {exc}")
                continue
            try:
                answer = json.loads(text)
            except ValueError:
                reasons.append(f"{url}: HTTP {resp.status}: {text[:200]}")
                continue
            if isinstance(answer, dict) and "error" in answer and "header" not in answer:
                message = str(answer.get("message") or answer["error"])
                if _retryable(message):
                    reasons.append(f"{url}: {message}")
                    continue
                raise EtcdError(message)
            self._current = index
            return answer
        raise EtcdUnavailable("; ".join(reasons))

    # ------------------------------------------------------------------ kv

    async def get(self, key: str) -> KeyValue | None:
        answer = await self.call("kv/range", {"key": b64(key)})
        kvs = answer.get("kvs") or []
        return KeyValue.from_json(kvs[0]) if kvs else None

    async def get_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        """Every key under ``prefix`` and the store revision of that read."""
        answer = await self.call("kv/range", {"key": b64(prefix), "range_end": prefix_end(prefix)})
        revision = int(answer.get("header", {}).get("revision", 0))
        return [KeyValue.from_json(kv) for kv in answer.get("kvs") or []], revision

    async def put(self, key: str, value: bytes | str, lease: int = 0) -> int:
        answer = await self.call("kv/put", put_op(key, value, lease)["request_put"])
        return int(answer.get("header", {}).get("revision", 0))

    async def delete(self, key: str) -> int:
        answer = await self.call("kv/deleterange", {"key": b64(key)})
        return int(answer.get("deleted", 0))

    async def txn(
        self,
        compare: list[dict[str, Any]],
        success: list[dict[str, Any]],
        failure: list[dict[str, Any]] | None = None,
    ) -> TxnResult:
        body: dict[str, Any] = {"compare": compare, "success": success}
        if failure:
            body["failure"] = failure
        answer = await self.call("kv/txn", body)
        return TxnResult(
            bool(answer.get("succeeded", False)),
            int(answer.get("header", {}).get("revision", 0)),
            list(answer.get("responses") or []),
        )

    # ------------------------------------------------------------------ leases

    async def grant(self, ttl: int) -> int:
        answer = await self.call("lease/grant", {"TTL": str(ttl)})
        return int(answer["ID"])

    async def keepalive(self, lease: int) -> int:
        """Refresh ``lease`` once; its remaining TTL (0: the lease is gone)."""
        answer = await self.call("lease/keepalive", {"ID": str(lease)})
        result = answer.get("result", answer)
        return int(result.get("TTL", 0))

    async def revoke(self, lease: int) -> None:
        try:
            await self.call("lease/revoke", {"ID": str(lease)}, timeout=1.0)
        except EtcdError:
            pass  # already gone

    async def status(self, endpoint: str, timeout: float = 1.0) -> dict[str, Any]:
        """``maintenance/status`` of one endpoint (leader id, raft term, errors)."""
        async with asyncio.timeout(timeout):
            async with self._http().post(f"{endpoint}/v3/maintenance/status", json={}) as resp:
                return dict(await resp.json(content_type=None))

    # ------------------------------------------------------------------ watch

    async def watch(self, prefix: str, start_revision: int) -> AsyncIterator[list[Event]]:
        """Batches of events under ``prefix`` from ``start_revision`` on, forever.

        Reconnects (to the next endpoint) after a broken stream, from the revision after the
        last delivered one. Raises ``EtcdError`` if etcd compacted the revisions away (the
        caller then reloads everything).
        """
        next_rev = start_revision
        attempt = 0
        while True:
            url = self.endpoints[self._current]
            body = {
                "create_request": {
                    "key": b64(prefix),
                    "range_end": prefix_end(prefix),
                    "start_revision": str(next_rev),
                    "progress_notify": True,
                }
            }
            try:
                timeout = aiohttp.ClientTimeout(total=None, sock_connect=2.0, sock_read=None)
                async with self._http().post(f"{url}/v3/watch", json=body, timeout=timeout) as resp:
                    async for line in resp.content:
                        if not line.strip():
                            continue
                        msg = json.loads(line)
                        result = msg.get("result") or {}
                        if msg.get("error"):
                            raise EtcdError(str(msg["error"].get("message", msg["error"])))
                        if result.get("compact_revision") and result.get("canceled"):
                            raise EtcdError(
                                f"watch from revision {next_rev} compacted "
                                f"(oldest kept {result['compact_revision']})"
                            )
                        if result.get("canceled"):  # e.g. the member is shutting down
                            reason = result.get("cancel_reason") or "canceled by etcd"
                            raise aiohttp.ClientPayloadError(f"watch canceled: {reason}")
                        attempt = 0
                        events = [
                            Event(e.get("type", "PUT"), KeyValue.from_json(e["kv"]))
                            for e in result.get("events") or []
                        ]
                        if events:
                            next_rev = events[-1].kv.mod_revision + 1
                            yield events
            except (aiohttp.ClientError, OSError, ValueError) as exc:
                log.info("etcd watch on %s broke (%s); reconnecting", url, exc)
            self._current = (self._current + 1) % len(self.endpoints)
            attempt += 1
            await asyncio.sleep(min(2.0, 0.05 * 2 ** min(attempt, 6)))


def _retryable(message: str) -> bool:
    """etcd errors that another member (or a moment later) may not give."""
    return any(
        s in message
        for s in ("no leader", "timed out", "leader changed", "not capable", "unhealthy")
    )
