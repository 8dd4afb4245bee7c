"""Block sources: the in-process pool, the mapped arena, the FetchBlocks fallback, the split."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
import torch

from kvstore.arena import Arena, ArenaReader
from kvstore.codec.raw import encode_raw
from kvstore.errors import InvalidArgument
from kvstore.keys import ChunkKey
from kvstore.layout import KVLayout
from kvstore.sparse import (
    KIND_KEY,
    KIND_VALUE,
    ArenaBlockSource,
    BlockGeometry,
    BlockSource,
    BlockStore,
    HostBlockPool,
    RemoteBlockSource,
    SplitBlockSource,
)

GEO = BlockGeometry(num_layers=2, num_kv_heads=3, head_dim=16, block_tokens=8, dtype="float16")
ROPE = (1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16)), 1.0)
CHUNK = 32  # tokens per stored chunk in these tests (4 blocks)


def _kv(num_tokens: int, seed: int = 0) -> np.ndarray:
    """Canonical ``[L, 2, H, tokens, D]`` float16."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((2, 2, 3, num_tokens, 16)).astype(np.float16)


def _pool_from(kv: np.ndarray) -> HostBlockPool:
    pool = HostBlockPool(GEO, kv.shape[3] // 8, pin=False)
    for layer in range(2):
        for kind in (KIND_KEY, KIND_VALUE):
            blocks = torch.from_numpy(kv[layer, kind]).view(3, -1, 8, 16)
            pool.write(layer, kind, 0, blocks)
    return pool


def _gather(source: BlockSource, layer: int, kind: int, rope=None) -> torch.Tensor:
    blocks = torch.tensor([[5, 0, 7], [2, 3, 1], [6, 6 - 6, 4]])
    slots = torch.tensor([[0, 2, -1], [1, -1, 0], [2, 1, 0]])
    out = torch.zeros(3, 3, 8, 16)
    source.gather(layer, kind, blocks, slots, out, rope)
    return out


class FakeFetcher:
    """A daemon's FetchBlocks served from a pool, counting calls (a fake, not a mock)."""

    def __init__(self, pool: HostBlockPool) -> None:
        self.pool, self.calls = pool, 0

    def fetch_blocks(self, layer: int, kind: int, heads: Sequence[int],
                     blocks: Sequence[int]) -> bytes:
        self.calls += 1
        rows = [self.pool.data[layer, kind, h, b] for h, b in zip(heads, blocks, strict=True)]
        return torch.stack(rows).numpy().tobytes()


def test_pool_gather_returns_written_blocks_and_counts_bytes() -> None:
    kv = _kv(64)
    pool = _pool_from(kv)
    out = torch.zeros(3, 3, 8, 16)
    fetched = pool.gather(1, KIND_VALUE, torch.tensor([[5], [2], [7]]),
                          torch.tensor([[1], [-1], [0]]), out)
    assert fetched == 2 * GEO.block_bytes
    assert torch.equal(out[0, 1].half(), torch.from_numpy(kv[1, 1, 0, 40:48]))
    assert torch.equal(out[2, 0].half(), torch.from_numpy(kv[1, 1, 2, 56:64]))
    assert out[1].abs().sum() == 0
    assert isinstance(pool, BlockStore)


def test_arena_source_matches_pool_over_leased_raw_chunks() -> None:
    kv = _kv(64, seed=1)
    layout = KVLayout(num_layers=2, num_kv_heads=3, head_dim=16, dtype="float16",
                      chunk_tokens=CHUNK)
    arena = Arena(1 << 20)
    try:
        keys = [ChunkKey(bytes([i]) * 32) for i in range(2)]
        arena.put(ChunkKey(b"x" * 32), b"unrelated object first")  # extents are not at 0
        for i, key in enumerate(keys):
            assert arena.put(key, encode_raw(kv[:, :, :, i * CHUNK : (i + 1) * CHUNK], layout))
        lease, extents = arena.lease(keys)
        reader = ArenaReader(arena.path)
        source = ArenaBlockSource(reader, extents, GEO)
        pool = _pool_from(kv)
        assert source.num_blocks == 8
        for layer, kind in ((0, KIND_KEY), (1, KIND_VALUE)):
            assert torch.equal(_gather(source, layer, kind), _gather(pool, layer, kind))
        torch.testing.assert_close(_gather(source, 0, KIND_KEY, ROPE),
                                   _gather(pool, 0, KIND_KEY, ROPE))
        arena.release(lease)
        reader.close()
    finally:
        arena.close()


def test_remote_source_makes_one_batched_call_per_gather() -> None:
    pool = _pool_from(_kv(64, seed=2))
    fetcher = FakeFetcher(pool)
    remote = RemoteBlockSource(fetcher, GEO)
    for kind, rope in ((KIND_VALUE, None), (KIND_KEY, ROPE)):
        torch.testing.assert_close(_gather(remote, 1, kind, rope), _gather(pool, 1, kind, rope))
    assert fetcher.calls == 2


def test_remote_source_rejects_short_reply() -> None:
    class Short(FakeFetcher):
        def fetch_blocks(self, *args) -> bytes:
            return super().fetch_blocks(*args)[:-2]

    remote = RemoteBlockSource(Short(_pool_from(_kv(64))), GEO)
    with pytest.raises(InvalidArgument, match="FetchBlocks returned"):
        _gather(remote, 0, KIND_VALUE)


def test_split_source_writes_tail_and_reads_both_sides() -> None:
    kv = _kv(64, seed=3)
    prefix = _pool_from(kv[:, :, :, :32])
    tail = HostBlockPool(GEO, 2, first_block=4, pin=False)
    split = SplitBlockSource(prefix, 4, tail)
    for layer in range(2):
        for kind in (KIND_KEY, KIND_VALUE):
            new = torch.from_numpy(kv[layer, kind, :, 32:]).view(3, -1, 8, 16)
            split.write(layer, kind, 4, new)
    whole = _pool_from(kv)
    for kind, rope in ((KIND_VALUE, None), (KIND_KEY, ROPE)):
        torch.testing.assert_close(_gather(split, 0, kind, rope), _gather(whole, 0, kind, rope))
    assert prefix.data[:, :, :, :4].float().abs().sum() > 0  # the prefix stayed as written


def test_split_source_rejects_misplaced_tail() -> None:
    with pytest.raises(InvalidArgument, match="tail pool starts"):
        SplitBlockSource(_pool_from(_kv(32)), 4, HostBlockPool(GEO, 2, first_block=3, pin=False))
