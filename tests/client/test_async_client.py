"""AsyncClient mirrors Client: round trips, layer streaming, errors, failover."""

from __future__ import annotations

import asyncio
import socket

import numpy as np
import pytest
import torch

from kvstore.client import AsyncClient
from kvstore.errors import DeadlineExceeded, InvalidArgument
from tests.conftest import make_kv, make_tokens


@pytest.mark.parametrize("transport", ["stream", "arena"])
def test_async_round_trip_lookup_and_layers(server, layout, transport):
    tokens, kv = make_tokens(56), make_kv(layout, 56)

    async def run() -> None:
        async with AsyncClient(server.address, "m", layout, transport=transport) as c:
            assert await c.lookup(tokens) == 0
            assert await c.get(tokens) is None
            assert await c.put(tokens, torch.from_numpy(kv)) == 48
            assert await c.lookup(tokens) == 48
            back = await c.get(tokens)
            assert torch.equal(back, torch.from_numpy(kv[:, :, :, :48]))
            filtered = await c.get(tokens, layers=[1], as_numpy=True)
            assert np.array_equal(filtered, kv[1:2, :, :, :48])
            layers = [(i, arr) async for i, arr in c.get_layers(tokens, as_numpy=True)]
            assert [i for i, _ in layers] == list(range(layout.num_layers))
            assert all(np.array_equal(arr, kv[i, :, :, :48]) for i, arr in layers)
            assert await c.prefetch(tokens) == 48
            assert (await c.stats())["tiers"][0]["name"] == "cpu"
            assert await c.delete(tokens) == 3

    asyncio.run(run())


def test_async_position_free_chunk_round_trips(server, layout):
    tokens, kv = make_tokens(21), make_kv(layout, 21)

    async def run() -> None:
        async with AsyncClient(server.address, "m", layout) as c:
            assert await c.put_chunk(tokens, kv)
            assert await c.lookup_chunk(tokens)
            assert np.array_equal(await c.get_chunk(tokens, as_numpy=True), kv)
            assert await c.delete_chunk(tokens)

    asyncio.run(run())


def test_async_bad_input_and_short_deadline_raise_kvstore_errors(server, layout):
    async def run() -> None:
        async with AsyncClient(server.address, "m", layout) as c:
            with pytest.raises(InvalidArgument, match="float64"):
                await c.put(make_tokens(16), make_kv(layout, 16).astype(np.float64))
        async with AsyncClient(server.address, "m", layout, timeout_s=1e-6) as c:
            with pytest.raises(DeadlineExceeded):
                await c.lookup(make_tokens(16))

    asyncio.run(run())


def test_async_failover_skips_dead_address(server, layout):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    tokens, kv = make_tokens(32), make_kv(layout, 32)

    async def run() -> None:
        async with AsyncClient([dead, server.address], "m", layout, timeout_s=10) as c:
            assert await c.put(tokens, kv) == 32
            assert np.array_equal(await c.get(tokens, as_numpy=True), kv)

    asyncio.run(run())


def test_async_concurrent_calls_share_one_client(server, layout):
    async def run() -> None:
        async with AsyncClient(server.address, "m", layout) as c:
            seqs = [(make_tokens(32, seed=i), make_kv(layout, 32, seed=i)) for i in range(8)]
            await asyncio.gather(*(c.put(t, kv) for t, kv in seqs))
            backs = await asyncio.gather(*(c.get(t, as_numpy=True) for t, _ in seqs))
            assert all(np.array_equal(b, kv) for b, (_, kv) in zip(backs, seqs, strict=True))

    asyncio.run(run())
