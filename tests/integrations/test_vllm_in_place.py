"""The vLLM worker's loads on the daemon's host: read in place from the arena, exact bytes.

A real daemon (in this process, so a test can damage its arena), a real Client,
the worker half of the connector and paged KV tensors on the CPU; the expected
blocks are built one token at a time.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from kvstore.client import Client
from kvstore.integrations._vllm_worker import LoadSpec, Worker
from kvstore.layout import KVLayout

HEADS, DIM, LAYERS, BLOCK, NUM_BLOCKS = 2, 16, 3, 16, 24
NAMES = [f"layer.{i}" for i in range(LAYERS)]


def _layout(chunk_tokens: int, dtype: str = "float16") -> KVLayout:
    return KVLayout(LAYERS, HEADS, DIM, dtype=dtype, chunk_tokens=chunk_tokens)


def _paged(strided: bool, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    if strided:  # tokens outside heads, as GPU backends lay it out
        backing = torch.zeros(LAYERS, NUM_BLOCKS, BLOCK, HEADS, 2 * DIM, dtype=dtype)
        return {n: backing[i].permute(0, 2, 1, 3) for i, n in enumerate(NAMES)}
    backing = torch.zeros(LAYERS, NUM_BLOCKS, HEADS, BLOCK, 2 * DIM, dtype=dtype)
    return {n: backing[i] for i, n in enumerate(NAMES)}


def _expected(kv: torch.Tensor, table: list[int], start: int, end: int,
              like: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The blocks after loading tokens [start, end) of ``kv``, one token at a time."""
    out = [torch.zeros_like(t) for t in like.values()]
    for layer, paged in enumerate(out):
        for t in range(start, end):
            paged[table[t // BLOCK], :, t % BLOCK, :DIM] = kv[layer, 0, :, t]
            paged[table[t // BLOCK], :, t % BLOCK, DIM:] = kv[layer, 1, :, t]
    return out


def _assert_leases_released(server) -> None:
    """The loader releases its lease after the step's outcome is final, so soon after."""
    deadline = time.monotonic() + 10
    while server.engine.dram.stats().info["leases"] != "0":
        assert time.monotonic() < deadline, "the in-place load never released its lease"
        time.sleep(0.01)


class _Setup:
    def __init__(self, address: str, layout: KVLayout, namespace: str, *, strided: bool = False,
                 transport: str = "auto") -> None:
        self.layout = layout
        dtype = getattr(torch, layout.dtype)
        self.paged = _paged(strided, dtype)
        self.worker = Worker(layout, NAMES, BLOCK, lambda: Client(
            address, namespace, layout, timeout_s=10, transport=transport), 10.0)
        self.worker.register(self.paged)
        self.client = Client(address, namespace, layout, timeout_s=10)
        self.table = [int(b) for b in torch.randperm(NUM_BLOCKS)]

    def load(self, tokens: np.ndarray, start: int, end: int) -> set[int]:
        """One step of the worker around a forward; the block load errors it reports."""
        self.worker.start_step([LoadSpec("r", tokens, self.table, start, end)], [])
        for name in NAMES:
            self.worker.wait_for_layer(name)
        self.worker.end_step()
        return self.worker.take_load_errors()

    def close(self) -> None:
        self.worker.close()
        self.client.close()


@pytest.fixture
def setup(server):
    made: list[_Setup] = []

    def make(layout: KVLayout, namespace: str, **kwargs) -> _Setup:
        made.append(_Setup(server.address, layout, namespace, **kwargs))
        return made[-1]

    yield make
    for s in made:
        s.close()


def _stored(setup_: _Setup, num_tokens: int, seed: int = 0) -> tuple[np.ndarray, torch.Tensor]:
    tokens = np.random.default_rng(seed).integers(0, 30_000, num_tokens).astype(np.int32)
    kv = torch.randn(setup_.layout.shape(num_tokens), generator=torch.Generator()
                     .manual_seed(seed)).to(getattr(torch, setup_.layout.dtype))
    setup_.client.put(tokens, kv)
    return tokens, kv


@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("start,end", [(0, 128), (48, 112), (16, 16 + BLOCK)])
def test_same_host_load_reads_in_place_and_writes_exactly_the_stored_bytes(
        setup, server, strided, dtype, start, end):
    s = setup(_layout(32, dtype), f"inplace-{dtype}", strided=strided)
    tokens, kv = _stored(s, 128)
    assert s.load(tokens[:-(-end // 32) * 32], start, end) == set()
    assert (s.worker.num_loads_in_place, s.worker.num_loads_streamed) == (1, 0)
    for got, want in zip(s.paged.values(), _expected(kv, s.table, start, end, s.paged),
                         strict=True):
        assert torch.equal(got, want)  # the tokens asked, nothing outside them
    _assert_leases_released(server)


def test_chunks_that_do_not_split_into_whole_blocks_still_load_exactly(setup):
    s = setup(_layout(24), "inplace-24")  # 24-token chunks over 16-token blocks
    tokens, kv = _stored(s, 96)
    assert s.load(tokens, 0, 96) == set()
    assert s.worker.num_loads_in_place == 1
    for got, want in zip(s.paged.values(), _expected(kv, s.table, 0, 96, s.paged),
                         strict=True):
        assert torch.equal(got, want)


def test_a_chunk_corrupt_in_the_arena_fails_exactly_its_blocks_and_later_ones(setup, server):
    s = setup(_layout(32), "inplace-corrupt")
    tokens, kv = _stored(s, 128)
    with s.client.lease(tokens) as lease:
        extent = lease.extents[2]  # tokens [64, 96)
    server.engine.dram._arena._view[extent.offset + extent.length - 5] ^= 0x10
    errors = s.load(tokens, 0, 128)
    assert errors == set(s.table[64 // BLOCK:128 // BLOCK])  # chunk 2 onwards, no earlier
    assert (s.worker.num_loads_in_place, s.worker.num_loads_streamed) == (1, 0)
    want = _expected(kv, s.table, 0, 64, s.paged)
    for got, good in zip(s.paged.values(), want, strict=True):
        rows = s.table[:64 // BLOCK]
        assert torch.equal(got[rows], good[rows])  # the chunks before it are exact
    _assert_leases_released(server)


@pytest.mark.parametrize("transport", ["auto", "stream"])
def test_chunks_evicted_since_the_lookup_load_the_stored_run_and_fail_the_rest(setup,
                                                                              transport):
    s = setup(_layout(32), "inplace-evicted", transport=transport)
    tokens, kv = _stored(s, 64)  # the scheduler planned 128 tokens; 64 remain
    more = np.concatenate([tokens, np.arange(64, dtype=np.int32)])
    # vLLM rewinds to the first block reported and keeps the ones before it: those
    # must hold the stored tokens.
    assert s.load(more, 16, 128) == set(s.table[64 // BLOCK:128 // BLOCK])
    for got, want in zip(s.paged.values(), _expected(kv, s.table, 16, 64, s.paged),
                         strict=True):
        assert torch.equal(got, want)


def test_compressed_chunks_and_stream_transport_load_through_the_stream(setup, server):
    s = setup(_layout(32), "inplace-kvq")
    tokens = np.arange(64, dtype=np.int32) + 5
    kv = torch.randn(s.layout.shape(64)).half()
    with Client(server.address, "inplace-kvq", s.layout,
                codec="balanced") as lossy:
        lossy.put(tokens, kv)
        decoded = lossy.get(tokens)
    assert s.load(tokens, 0, 64) == set()
    assert (s.worker.num_loads_in_place, s.worker.num_loads_streamed) == (0, 1)
    for got, want in zip(s.paged.values(), _expected(decoded, s.table, 0, 64, s.paged),
                         strict=True):
        assert torch.equal(got, want)

    remote = setup(_layout(32), "inplace-kvq", transport="stream")  # as from another host
    assert remote.load(tokens, 0, 64) == set()
    assert (remote.worker.num_loads_in_place, remote.worker.num_loads_streamed) == (0, 1)
