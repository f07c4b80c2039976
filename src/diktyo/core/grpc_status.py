"""gRPC status codes by name (grpc/doc/statuscodes.md), shared by translation and the proxy."""

from __future__ import annotations

STATUS_CODES: dict[str, int] = {
    "OK": 0,
    "CANCELLED": 1,
    "UNKNOWN": 2,
    "INVALID_ARGUMENT": 3,
    "DEADLINE_EXCEEDED": 4,
    "NOT_FOUND": 5,
    "ALREADY_EXISTS": 6,
    "PERMISSION_DENIED": 7,
    "RESOURCE_EXHAUSTED": 8,
    "FAILED_PRECONDITION": 9,
    "ABORTED": 10,
    "OUT_OF_RANGE": 11,
    "UNIMPLEMENTED": 12,
    "INTERNAL": 13,
    "UNAVAILABLE": 14,
    "DATA_LOSS": 15,
    "UNAUTHENTICATED": 16,
}

# Envoy's Grpc::Utility::grpcToHttpStatus: the HTTP status a non-gRPC client gets
HTTP_STATUS: dict[int, int] = {
    0: 200, 1: 499, 2: 500, 3: 400, 4: 504, 5: 404, 6: 409, 7: 403, 8: 429,
    9: 400, 10: 409, 11: 400, 12: 501, 13: 500, 14: 503, 15: 500, 16: 401,
}  # fmt: skip


def parse_status(value: str | None) -> int | None:
    """A ``grpc-status`` value or an Istio ``grpcStatus`` name (``UNAVAILABLE``) as a code."""
    if value is None:
        return None
    v = value.strip()
    if v.isdigit():
        return int(v)
    return STATUS_CODES.get(v.upper())
