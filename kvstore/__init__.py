"""kvstore: a tiered KV-cache store for LLM inference.

``from kvstore import Client, KVLayout`` is all a user needs to talk to a daemon;
it imports neither torch nor the server.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvstore._version import __version__
from kvstore.errors import (
    CapacityExhausted,
    Corrupt,
    InvalidArgument,
    KVStoreError,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from kvstore.layout import KVLayout

if TYPE_CHECKING:
    from kvstore.client import AsyncClient, Client

__all__ = [
    "AsyncClient",
    "CapacityExhausted",
    "Client",
    "Corrupt",
    "InvalidArgument",
    "KVLayout",
    "KVStoreError",
    "NotFound",
    "PermissionDenied",
    "Unavailable",
    "__version__",
]


def __getattr__(name: str) -> Any:
    # Lazy so that `import kvstore` (e.g. from the server) does not load grpc client code.
    if name in ("Client", "AsyncClient"):
        from kvstore import client

        return getattr(client, name)
    raise AttributeError(f"module 'kvstore' has no attribute {name!r}")
