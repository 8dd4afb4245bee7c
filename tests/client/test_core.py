"""Client and AsyncClient are one core driven two ways: same methods, signatures, behaviour."""

from __future__ import annotations

import asyncio
import inspect

import numpy as np
import pytest

from kvstore.client import AsyncClient, Client
from kvstore.client._core import ClientCore
from tests.conftest import make_kv, make_tokens


def _public(cls: type) -> dict[str, inspect.Signature]:
    return {name: inspect.signature(member) for name, member in inspect.getmembers(cls)
            if not name.startswith("_") and callable(member)}


def test_sync_and_async_clients_have_the_same_methods_and_signatures() -> None:
    sync, aio = _public(Client), _public(AsyncClient)
    assert sync == aio
    assert inspect.signature(Client.__init__) == inspect.signature(AsyncClient.__init__)
    assert {"lease", "get_layers", "put_blob", "close"} <= set(sync)


def test_every_plan_of_the_core_is_driven_by_both_clients() -> None:
    plans = {name for name, member in vars(ClientCore).items()
             if not name.startswith("_") and inspect.isgeneratorfunction(member)}
    assert plans >= {"put", "get", "get_layers", "lease"}
    for cls in (Client, AsyncClient):
        assert plans <= set(vars(cls)), cls
        for name in plans:
            assert vars(cls)[name].__wrapped__ is vars(ClientCore)[name], (cls, name)
    for name in plans - {"get_layers"}:
        assert inspect.iscoroutinefunction(getattr(AsyncClient, name)), name
    assert inspect.isasyncgenfunction(AsyncClient.get_layers)
    assert inspect.isgeneratorfunction(Client.get_layers)


def test_async_lease_pins_chunks_with_a_ttl_and_releases(server, layout) -> None:
    tokens, kv = make_tokens(48), make_kv(layout, 48)

    async def run() -> None:
        async with AsyncClient(server.address, "m", layout) as c:
            await c.put(tokens, kv)
            async with await c.lease(tokens, ttl_s=5.0) as lease:
                assert lease.num_chunks_stored == 3 and len(lease.extents) == 3
                assert 0 < lease.ttl_s <= 5.0
                assert lease.lease_id
                assert server.engine.dram.stats().info["leases"] == "1"
            assert lease.lease_id == 0
            assert server.engine.dram.stats().info["leases"] == "0"

    asyncio.run(run())


def test_sync_lease_ttl_is_sent_to_the_daemon(client, layout) -> None:
    tokens, kv = make_tokens(32), make_kv(layout, 32)
    c = client()
    c.put(tokens, kv)
    with c.lease(tokens, ttl_s=2.0) as lease:
        assert 0 < lease.ttl_s <= 2.0 and len(lease.extents) == 2


@pytest.mark.parametrize("transport", ["stream", "arena"])
def test_sync_and_async_return_the_same_bytes(client, server, layout, transport) -> None:
    tokens, kv = make_tokens(40), make_kv(layout, 40)
    c = client(transport=transport)
    c.put(tokens, kv)
    want = c.get(tokens, layers=[0, 2], as_numpy=True)

    async def run() -> np.ndarray:
        async with AsyncClient(server.address, "model@rev", layout, transport=transport) as a:
            return await a.get(tokens, layers=[0, 2], as_numpy=True)

    assert np.array_equal(asyncio.run(run()), want)
