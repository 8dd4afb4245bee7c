"""Clients of the kvstore daemon: ``Client`` (blocking) and ``AsyncClient`` (asyncio).

Importing this package loads only grpc, numpy and kvstore's errors, keys,
layout, codec format and generated proto: never torch (imported only when a
torch tensor is handed in or asked for), the server, the tiers or the engine.
"""

from kvstore.client.aio import AsyncClient
from kvstore.client.sync import Client, fetch_stats

__all__ = ["AsyncClient", "Client", "fetch_stats"]
