"""FetchBlocks through a real daemon: blocks sliced from stored chunks, byte for byte."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from kvstore.errors import InvalidArgument, NotFound
from tests.conftest import make_kv, make_tokens

NUM_TOKENS = 32  # two 16-token chunks of the small layout


@pytest.fixture
def stored(client, layout):
    """A client and the (tokens, kv) it put: 2 chunks, float16."""
    c = client()
    tokens, kv = make_tokens(NUM_TOKENS, seed=3), make_kv(layout, NUM_TOKENS, seed=3)
    assert c.put(tokens, kv) == NUM_TOKENS
    return c, tokens, kv


def _reference(kv: np.ndarray, layer: int, kind: int, heads, blocks, block_tokens: int) -> bytes:
    rows = [kv[layer, kind, h, b * block_tokens : (b + 1) * block_tokens]
            for h, b in zip(heads, blocks, strict=True)]
    return b"".join(np.ascontiguousarray(r).tobytes() for r in rows)


@pytest.mark.parametrize("block_tokens", [8, 4])
def test_fetch_blocks_returns_slices_in_request_order(stored, block_tokens):
    c, tokens, kv = stored
    num_blocks = NUM_TOKENS // block_tokens
    heads = [2, 0, 1, 2, 0, 1, 2]
    blocks = [num_blocks - 1, 0, 1, 0, num_blocks - 1, num_blocks // 2, num_blocks - 1]
    for layer, kind in ((0, 0), (3, 1), (1, 0)):
        data = c.fetch_blocks(tokens, layer, kind, heads, blocks, block_tokens=block_tokens)
        assert data == _reference(kv, layer, kind, heads, blocks, block_tokens)


def test_fetch_blocks_with_no_blocks_returns_empty(stored):
    c, tokens, _ = stored
    assert c.fetch_blocks(tokens, 0, 1, [], []) == b""


def test_async_fetch_blocks_returns_same_bytes_as_sync(stored, server, layout):
    from kvstore.client import AsyncClient

    _, tokens, kv = stored

    async def run() -> bytes:
        async with AsyncClient(server.address, "model@rev", layout, timeout_s=20.0) as ac:
            return await ac.fetch_blocks(tokens, 2, 1, [1, 0], [3, 2])

    assert asyncio.run(run()) == _reference(kv, 2, 1, [1, 0], [3, 2], 8)


def test_remote_block_source_over_client_gathers_stored_rows(stored, layout):
    torch = pytest.importorskip("torch")
    from kvstore.sparse.blocks import BlockGeometry, ClientBlockFetcher, RemoteBlockSource

    c, tokens, kv = stored
    geometry = BlockGeometry(layout.num_layers, layout.num_kv_heads, layout.head_dim, 8,
                             layout.dtype)
    source = RemoteBlockSource(ClientBlockFetcher(c, tokens), geometry)
    blocks = torch.tensor([[3, 0], [1, 2], [0, 3]])
    slots = torch.tensor([[0, 1], [-1, 0], [1, -1]])
    out = torch.zeros(3, 2, 8, layout.head_dim, dtype=torch.float16)
    fetched = source.gather(1, 1, blocks, slots, out)
    assert fetched == 4 * geometry.block_bytes and source.num_calls == 1
    for h, i in ((0, 0), (0, 1), (1, 1), (2, 0)):
        b, s = int(blocks[h, i]), int(slots[h, i])
        assert np.array_equal(out[h, s].numpy(), kv[1, 1, h, b * 8 : (b + 1) * 8])
    assert not out[1, 1].any() and not out[2, 0].any()  # slots no live block names


@pytest.mark.parametrize(("layer", "kind", "heads", "blocks", "match"), [
    (4, 0, [0], [0], "layer 4 out of range"),
    (0, 2, [0], [0], "kind must be 0"),
    (0, 0, [0, 3], [0, 0], r"heads\[1\] = 3 out of range"),
    (0, 0, [0], [4], r"blocks\[0\] = 4 out of range"),
    (0, 0, [0, 1], [0], "must match"),
])
def test_fetch_blocks_out_of_range_is_invalid_argument(stored, layer, kind, heads, blocks,
                                                       match):
    c, tokens, _ = stored
    with pytest.raises(InvalidArgument, match=match):
        c.fetch_blocks(tokens, layer, kind, heads, blocks)


def test_fetch_blocks_over_call_limit_is_invalid_argument(stored):
    c, tokens, _ = stored
    n = (1 << 16) + 1
    with pytest.raises(InvalidArgument, match="at most 65536"):
        c.fetch_blocks(tokens, 0, 0, [0] * n, [0] * n)


def test_fetch_blocks_with_block_tokens_not_dividing_chunk_is_invalid_argument(stored):
    c, tokens, _ = stored
    with pytest.raises(InvalidArgument, match="does not divide chunk_tokens 16"):
        c.fetch_blocks(tokens, 0, 0, [0], [0], block_tokens=6)


def test_fetch_blocks_of_unstored_chunk_is_not_found(stored):
    c, tokens, _ = stored
    longer = np.concatenate([tokens, make_tokens(16, seed=9)])  # chunk 2 was never put
    assert c.fetch_blocks(longer, 0, 0, [1], [3]) == c.fetch_blocks(tokens, 0, 0, [1], [3])
    with pytest.raises(NotFound, match="chunk 2"):
        c.fetch_blocks(longer, 0, 0, [1, 0], [0, 4])


def test_fetch_blocks_of_other_sequence_is_not_found(stored):
    c, _, _ = stored
    with pytest.raises(NotFound, match="chunk 0"):
        c.fetch_blocks(make_tokens(NUM_TOKENS, seed=11), 0, 1, [0], [0])


def test_fetch_blocks_of_kvq_chunks_matches_get(client, layout):
    c = client(codec="balanced")
    tokens, kv = make_tokens(NUM_TOKENS, seed=5), make_kv(layout, NUM_TOKENS, seed=5)
    c.put(tokens, kv)
    decoded = c.get(tokens, as_numpy=True)  # lossy: compare with what the daemon decodes
    heads, blocks = [0, 2, 1], [3, 0, 2]
    assert c.fetch_blocks(tokens, 1, 0, heads, blocks) == _reference(decoded, 1, 0, heads,
                                                                     blocks, 8)
