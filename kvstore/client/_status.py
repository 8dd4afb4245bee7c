"""The inverse of ``kvstore.server.status``: gRPC status codes -> kvstore.errors classes."""

from __future__ import annotations

import grpc

from kvstore.errors import (
    CapacityExhausted,
    Corrupt,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    KVStoreError,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)

ERROR_BY_STATUS: dict[grpc.StatusCode, type[KVStoreError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: CapacityExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.DATA_LOSS: Corrupt,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
}

# Codes after which the same call may succeed on another daemon. CANCELLED is
# included because the client never cancels its own calls: it means the daemon
# went away mid-call (e.g. a stream cut by shutdown).
FAILOVER_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})


def error_from_rpc(exc: grpc.RpcError, address: str) -> KVStoreError:
    """The kvstore error for a failed call; anything unmapped is a plain KVStoreError."""
    code = exc.code() if hasattr(exc, "code") else None  # type: ignore[attr-defined]
    details = exc.details() if hasattr(exc, "details") else str(exc)  # type: ignore[attr-defined]
    cls = ERROR_BY_STATUS.get(code, KVStoreError)  # type: ignore[arg-type]
    name = code.name if code is not None else "UNKNOWN"
    return cls(f"{details or name} [{name} from {address}]")


def is_failover(exc: grpc.RpcError) -> bool:
    """True if the call may succeed on another address."""
    return exc.code() in FAILOVER_CODES  # type: ignore[attr-defined]
