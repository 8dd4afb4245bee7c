"""THE table from kvstore.errors classes to gRPC status codes, and the abort helper.

This is the only place the two vocabularies meet on the server side; the client
keeps the inverse in ``kvstore.client._status``.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import NoReturn

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

log = logging.getLogger(__name__)

# Order matters: subclasses before their bases (DeadlineExceeded is an Unavailable,
# Unauthenticated a PermissionDenied).
STATUS_BY_ERROR: tuple[tuple[type[KVStoreError], grpc.StatusCode], ...] = (
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (CapacityExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (Corrupt, grpc.StatusCode.DATA_LOSS),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
)


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The status code a failure is reported with; INTERNAL for anything unexpected."""
    for cls, code in STATUS_BY_ERROR:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


def describe(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Status code and details for ``exc``; unexpected errors are logged with a traceback.

    The details of an INTERNAL error name only the exception type, so internals
    (paths, reprs) do not leak to callers; the log has the rest.
    """
    code = status_for(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.error("internal error while serving a request", exc_info=exc)
        return code, f"internal error ({type(exc).__name__}); see the daemon log"
    return code, str(exc) or type(exc).__name__


async def abort_with(context: grpc.aio.ServicerContext, exc: BaseException) -> NoReturn:
    """End the call with the status that ``exc`` maps to (raises grpc.aio.AbortError)."""
    code, details = describe(exc)
    await context.abort(code, details)
    raise AssertionError("context.abort returned")  # pragma: no cover - abort always raises


async def abort_unauthenticated(context: grpc.aio.ServicerContext, reason: str) -> NoReturn:
    """End the call with UNAUTHENTICATED: no valid bearer token (see server.auth)."""
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)
    raise AssertionError("context.abort returned")  # pragma: no cover


class RefusalLog:
    """One WARNING line per refused request, at most one per ``interval_s``.

    A client sending garbage in a loop must not flood the log (nor pay a traceback
    each): the refusals in between are counted and reported with the next line.
    """

    def __init__(self, interval_s: float = 10.0) -> None:
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._last_monotonic: float | None = None  # when the last line was written
        self._num_suppressed = 0  # refusals since then, not logged

    def refused(self, method: str, peer: str, code: grpc.StatusCode, details: str) -> bool:
        """Log one refusal unless one was logged in the last interval; True if logged."""
        now = time.monotonic()
        with self._lock:
            last = self._last_monotonic
            if last is not None and now - last < self._interval_s:
                self._num_suppressed += 1
                return False
            suppressed, self._num_suppressed, self._last_monotonic = self._num_suppressed, 0, now
        one_line = " ".join(details.split())[:300]
        log.warning("refused %s from %s with %s: %s%s", method, peer, code.name, one_line,
                    f" ({suppressed} more refusals not logged)" if suppressed else "")
        return True
