"""Same-host reads into the caller's buffers (get(out=)) and in place (view)."""

from __future__ import annotations

import asyncio
import dataclasses
import tracemalloc

import numpy as np
import pytest
import torch

from kvstore.client import AsyncClient
from kvstore.errors import Corrupt, InvalidArgument
from kvstore.layout import KVLayout
from tests.conftest import make_kv, make_tokens


def test_get_into_out_fills_the_callers_buffer_without_allocating(client, layout, server):
    tokens, kv = make_tokens(512), make_kv(layout, 512)  # 1.5 MB
    c = client(transport="arena")
    c.put(tokens, kv)
    out = np.zeros(layout.shape(528), dtype=np.float16)  # room for more than is stored
    c.get(tokens, out=out)  # warm-up: maps the arena
    tracemalloc.start()
    try:
        got = c.get(tokens, out=out)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        fresh = c.get(tokens, as_numpy=True)
        _, peak_fresh = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert np.array_equal(fresh, kv) and peak_fresh >= kv.nbytes  # get() allocates its result
    assert peak < kv.nbytes // 10  # get(out=) does not (a few small RPC objects)
    assert got.shape == kv.shape and np.shares_memory(got, out)
    assert np.array_equal(out[:, :, :, :512], kv) and not out[:, :, :, 512:].any()
    assert server.engine.dram.stats().info["leases"] == "0"


@pytest.mark.parametrize("transport", ["arena", "stream"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_get_into_torch_out_on_either_path(client, layout, transport, dtype):
    lay = dataclasses.replace(layout, dtype=dtype)
    tokens, kv = make_tokens(64), make_kv(lay, 64)
    c = client(f"out-{dtype}", lay, transport=transport)
    c.put(tokens[:32], kv[:, :, :, :32])  # only the first two chunks are stored
    out = torch.zeros(lay.shape(64), dtype=getattr(torch, dtype))
    got = c.get(tokens, out=out)
    assert isinstance(got, torch.Tensor) and got.shape[3] == 32
    assert got.data_ptr() == out.data_ptr()
    assert c.get(tokens, as_numpy=False).equal(got)
    layers = c.get(tokens, layers=[1, 3], out=torch.zeros(
        (2, *lay.shape(64)[1:]), dtype=getattr(torch, dtype)))
    assert layers.equal(got[[1, 3]])
    assert c.get(make_tokens(64, seed=9), out=out) is None  # a miss leaves out alone
    assert got.equal(c.get(tokens))


def test_wrong_out_buffers_are_invalid_argument_before_any_rpc(client, layout, server):
    c = client()
    tokens = make_tokens(64)
    shape = layout.shape(64)
    before = server.counters.num_requests
    bad = {
        "shape": np.zeros(layout.shape(48), dtype=np.float16),
        "heads": np.zeros((4, 2, 2, 64, 64), dtype=np.float16),
        "dtype": np.zeros(shape, dtype=np.float32),
        "contiguous": np.zeros((4, 2, 3, 64, 128), dtype=np.float16)[..., ::2],
        "writable": np.zeros(shape, dtype=np.float16),
        "torch strides": torch.zeros((4, 2, 3, 64, 64), dtype=torch.float16).transpose(3, 4),
        "grad": torch.zeros(shape, dtype=torch.float16, requires_grad=True),
        "list": [[0.0]],
    }
    bad["writable"].flags.writeable = False
    for name, out in bad.items():
        with pytest.raises(InvalidArgument, match="out|dtype"):
            c.get(tokens, out=out)
        assert name  # every case raised
    with pytest.raises(InvalidArgument, match="decode='client'"):
        c.get(tokens, out=np.zeros(shape, dtype=np.float16), decode="client")
    assert server.counters.num_requests == before


def test_view_reads_chunks_in_place_under_a_lease(client, layout, server):
    tokens, kv = make_tokens(64), make_kv(layout, 64)
    c = client()
    c.put(tokens, kv)
    with c.view(tokens) as view:
        assert view.num_tokens == 64 and len(view.chunks) == 4
        assert server.engine.dram.stats().info["leases"] == "1"
        for i, chunk in enumerate(view.chunks):
            assert not chunk.flags.writeable
            assert np.array_equal(chunk, kv[:, :, :, i * 16:(i + 1) * 16])
        with pytest.raises((TypeError, ValueError)):
            view.chunks[0][0, 0, 0, 0, 0] = 1
    assert server.engine.dram.stats().info["leases"] == "0"
    assert view.chunks == []


def test_view_refuses_compressed_chunks_and_corrupt_bytes(client, layout, server):
    tokens, kv = make_tokens(32), make_kv(layout, 32)
    client(codec="balanced").put(tokens, kv)
    with pytest.raises(InvalidArgument, match="compressed"):
        client().view(tokens)
    other = make_tokens(32, seed=4)
    client().put(other, kv)
    with client().lease(other) as lease:
        extent = lease.extents[1]
    server.engine.dram._arena._view[extent.offset + extent.length - 3] ^= 0x01
    with pytest.raises(Corrupt):
        client().view(other)
    with client().view(other, verify=False) as view:  # the caller's choice
        assert len(view.chunks) == 2
    assert server.engine.dram.stats().info["leases"] == "0"


def test_async_client_reads_into_out_and_in_place(layout, server):
    tokens, kv = make_tokens(48), make_kv(layout, 48)

    async def run() -> tuple[np.ndarray, list[np.ndarray]]:
        async with AsyncClient(server.address, "m", layout) as c:
            await c.put(tokens, kv)
            out = np.empty(layout.shape(48), dtype=np.float16)
            got = await c.get(tokens, out=out)
            assert np.shares_memory(got, out)
            async with await c.view(tokens) as view:
                copies = [chunk.copy() for chunk in view.chunks]
            return out, copies

    out, copies = asyncio.run(run())
    assert np.array_equal(out, kv)
    assert np.array_equal(np.concatenate(copies, axis=3), kv)
    assert server.engine.dram.stats().info["leases"] == "0"


def test_unverified_get_checks_headers_but_not_checksums(client, layout, server):
    tokens, kv = make_tokens(32), make_kv(layout, 32)
    c = client(transport="arena")
    c.put(tokens, kv)
    with c.lease(tokens) as lease:
        extent = lease.extents[1]
    arena = server.engine.dram._arena
    arena._view[extent.offset + extent.length - 1] ^= 0x01  # a payload byte
    with pytest.raises(Corrupt):
        c.get(tokens, as_numpy=True)
    got = c.get(tokens, as_numpy=True, verify=False, layers=[0, 3])
    assert np.array_equal(got[:, :, :, :16], kv[[0, 3], :, :, :16])
    arena._view[extent.offset] ^= 0x01  # the magic
    with pytest.raises(Corrupt):
        c.get(tokens, as_numpy=True, verify=False)


# 4 MiB chunks: a request of two or more is split across the client's copy threads.
BIG_LAYOUT = KVLayout(num_layers=4, num_kv_heads=8, head_dim=128, dtype="float16",
                      chunk_tokens=256)


@pytest.mark.parametrize("bad_chunk", [0, 3])  # on the calling thread / on the worker
def test_split_get_never_hands_back_a_corrupt_chunk(client, server, bad_chunk):
    tokens, kv = make_tokens(1024), make_kv(BIG_LAYOUT, 1024)  # 4 chunks, 16 MiB
    split = client("big", BIG_LAYOUT, transport="arena", copy_threads=2)
    assert split.put(tokens, kv) == 1024  # the same-host put, split across 2 threads too
    assert split._local.threads._pool is not None  # it did start a worker
    out = np.zeros_like(kv)
    assert np.array_equal(split.get(tokens, out=out, layers=None), kv)
    with split.lease(tokens) as lease:
        extent = lease.extents[bad_chunk]
    arena = server.engine.dram._arena
    arena._view[extent.offset + extent.length // 2] ^= 0x04  # one KV byte of that chunk
    for copy_threads in (2, 1):
        with pytest.raises(Corrupt, match=f"arena chunk {bad_chunk}: checksum"):
            client("big", BIG_LAYOUT, transport="arena", copy_threads=copy_threads).get(
                tokens, out=out)
    # "auto" streams the read instead: the daemon drops its bad DRAM copy and serves
    # what it still has verified (disk, once flushed). Only the returned view is
    # defined; out's other tokens may hold what the failed arena copy left there.
    got = client("big", BIG_LAYOUT, copy_threads=2).get(tokens, out=out, as_numpy=True)
    assert got is None or (np.shares_memory(got, out) and
                           np.array_equal(got, kv[:, :, :, :got.shape[3]]))


def test_split_and_single_thread_gets_agree_on_every_layer_subset(client):
    tokens, kv = make_tokens(768), make_kv(BIG_LAYOUT, 768, seed=3)
    client("big", BIG_LAYOUT, transport="stream").put(tokens, kv)
    for layers in (None, [0, 3], [2]):
        want = kv if layers is None else kv[layers]
        for copy_threads in (1, 2):
            c = client("big", BIG_LAYOUT, transport="arena", copy_threads=copy_threads)
            assert np.array_equal(c.get(tokens, layers=layers, as_numpy=True), want)
            out = np.zeros_like(want)
            assert np.array_equal(c.get(tokens, layers=layers, out=out), want)
