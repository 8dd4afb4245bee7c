"""The one error hierarchy of kvstore: every failure a caller can see is one of these.

The classes are transport-free. The server maps them to gRPC status codes in one
table (`kvstore.server.status`) and the client maps the codes back
(`kvstore.client._status`); nothing else raises bare exceptions across the API.
"""

from __future__ import annotations


class KVStoreError(Exception):
    """Base class of every error kvstore raises on purpose."""


class InvalidArgument(KVStoreError):
    """The caller sent something malformed: wrong shape, dtype, layout or tokens."""


class NotFound(KVStoreError):
    """A named thing does not exist (a namespace, a lease). Cache misses are not errors."""


class CapacityExhausted(KVStoreError):
    """A size limit was hit: message size, tier capacity, object size."""


class Unavailable(KVStoreError):
    """No daemon (or backing service) answered; retrying elsewhere may succeed."""


class Corrupt(KVStoreError):
    """Stored bytes failed validation: bad magic, version, length or checksum."""


class PermissionDenied(KVStoreError):
    """The caller's credentials do not allow this (missing/bad token, foreign tenant)."""


class Unauthenticated(PermissionDenied):
    """The call carries no credentials the daemon knows (missing or unknown bearer token)."""


class FailedPrecondition(KVStoreError):
    """The daemon lacks what the call needs (e.g. a GPU tier); another path may work."""


class DeadlineExceeded(Unavailable):
    """The caller's deadline passed before the daemon answered."""
