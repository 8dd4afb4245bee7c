"""Copies between kvstore's canonical KV and an engine's paged KV blocks (no engine import).

vLLM hands each attention layer's KV as ``[num_blocks, kv_heads, block_size, C]``
with ``C = head_size + head_size_v`` (K in the first ``head_size`` channels, V in
the rest); token ``t`` of a request lives in block ``block_ids[t // block_size]``
at offset ``t % block_size``. The strides depend on the attention backend (the
CPU backend's view is contiguous, GPU backends put tokens outside heads), so
every copy here goes through torch indexing, which follows the strides it is given.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kvstore.errors import InvalidArgument

# kvstore layout dtype name <-> torch dtype, for the engine connectors.
TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
DTYPE_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}


@dataclass(frozen=True, slots=True)
class Slots:
    """Where tokens ``[start, end)`` of one request sit in the paged KV.

    Whole blocks from ``start`` are copied a block at a time (one index per block);
    the tokens of a last partial block, or all of them when ``start`` is not
    block-aligned, one token at a time.
    """

    start: int  # first token (inclusive)
    end: int  # last token (exclusive)
    block_size: int
    whole_blocks: torch.Tensor  # [w] int64: blocks holding tokens [start, start + w * bs)
    tail_blocks: torch.Tensor  # [r] int64: block of each remaining token
    tail_offsets: torch.Tensor  # [r] int64: its offset inside the block

    @property
    def tail_start(self) -> int:
        return self.start + len(self.whole_blocks) * self.block_size


def slots_of(block_ids: Sequence[int], block_size: int, start: int, end: int,
             device: torch.device | str = "cpu") -> Slots:
    """The blocks and offsets of tokens ``[start, end)`` given the request's block table."""
    return _slots_in(_table(block_ids, block_size, end), block_size, start, end, device)


def chunk_slots(block_ids: Sequence[int], block_size: int, start: int, end: int,
                chunk_tokens: int, device: torch.device | str = "cpu") -> list[tuple[int, Slots]]:
    """Per stored chunk ``c`` that tokens ``[start, end)`` touch: ``(c, Slots)`` of the
    tokens it holds there. When ``block_size`` divides ``chunk_tokens`` and ``start``
    is block-aligned, every chunk maps onto whole blocks (no per-token tail)."""
    table = _table(block_ids, block_size, end)
    return [(c, _slots_in(table, block_size, max(start, c * chunk_tokens),
                          min(end, (c + 1) * chunk_tokens), device))
            for c in range(start // chunk_tokens, -(-end // chunk_tokens))]


def _table(block_ids: Sequence[int], block_size: int, end: int) -> torch.Tensor:
    needed = -(-end // block_size)
    if needed > len(block_ids):
        raise InvalidArgument(f"tokens up to {end} need {needed} blocks of {block_size}, "
                              f"the request has {len(block_ids)}")
    return torch.as_tensor(list(block_ids[:needed]), dtype=torch.int64)


def _slots_in(table: torch.Tensor, block_size: int, start: int, end: int,
              device: torch.device | str) -> Slots:
    if not 0 <= start <= end:
        raise InvalidArgument(f"tokens [{start}, {end}) is not a token range")
    num_whole = (end - start) // block_size if start % block_size == 0 else 0
    first = start // block_size
    tail = torch.arange(start + num_whole * block_size, end, dtype=torch.int64)
    return Slots(start, end, block_size, table[first:first + num_whole].to(device),
                 table[tail // block_size].to(device), (tail % block_size).to(device))


def check_paged(paged: torch.Tensor, num_kv_heads: int, head_dim: int, block_size: int) -> None:
    """Raise unless ``paged`` is ``[blocks, heads, block_size, 2 * head_dim]``."""
    shape = tuple(paged.shape)
    if len(shape) != 4 or shape[1:] != (num_kv_heads, block_size, 2 * head_dim):
        raise InvalidArgument(
            f"paged KV is {shape}, expected [num_blocks, {num_kv_heads}, {block_size}, "
            f"{2 * head_dim}] (heads, block size, K and V head sizes of the KV cache spec)")


def scatter_layer(paged: torch.Tensor, kv: torch.Tensor, slots: Slots,
                  first_token: int = 0) -> None:
    """Write tokens ``[slots.start, slots.end)`` of ``kv`` ([2, heads, n, dim]) into blocks.

    ``kv``'s token 0 is the request's token ``first_token`` (0: a stored prefix, of
    which only the tail from ``slots.start`` is written; earlier tokens are the
    engine's own prefix-cache hit).
    """
    heads, dim, bs = kv.shape[1], kv.shape[-1], slots.block_size
    kv = kv.to(device=paged.device, non_blocking=True)
    lo, split, hi = (t - first_token for t in (slots.start, slots.tail_start, slots.end))
    num_whole = len(slots.whole_blocks)
    if num_whole:
        # [2, heads, w * bs, dim] -> [w, heads, bs, 2, dim]: one row per block, K|V last
        src = kv[:, :, lo:split].reshape(2, heads, num_whole, bs, dim).permute(2, 1, 3, 0, 4)
        paged.unflatten(-1, (2, dim)).index_copy_(0, slots.whole_blocks, src)
    if len(slots.tail_blocks):
        # paged[blocks, :, offsets] is [r, heads, C]: advanced indices first, then the heads.
        tail = kv[:, :, split:hi].transpose(1, 2)  # [2, r, heads, dim]
        paged[slots.tail_blocks, :, slots.tail_offsets, :dim] = tail[0]
        paged[slots.tail_blocks, :, slots.tail_offsets, dim:] = tail[1]


def storage_view(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor as a numpy view in kvstore's storage dtype (bfloat16 as uint16 bits)."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


@dataclass(frozen=True, slots=True)
class ChunkCopy:
    """How one stored chunk, read in place, goes into the blocks (planned once per load).

    Whole blocks on the CPU go straight from the chunk with one indexed numpy copy
    per layer (numpy's strided copy runs about 4x torch's ``index_copy_`` on this
    pattern, and drops the GIL); anything else (a partial block, blocks on a
    device) is copied into a staging tensor and scattered from there.
    """

    index: int  # the chunk's position in the stored prefix
    slots: Slots  # the request tokens it writes
    first_token: int  # the request token held by the chunk's first row
    rows: np.ndarray | None  # [layers, w, heads, bs, 2, dim] view of the chunk, or None
    blocks: np.ndarray | None  # [w] int64 block ids the rows go to


def plan_chunk_copy(index: int, chunk: np.ndarray, slots: Slots, first_token: int,
                    is_cpu: bool) -> ChunkCopy:
    """Plan the copy of ``chunk`` ([layers, 2, heads, T, dim], storage dtype)."""
    if not is_cpu or len(slots.tail_blocks):
        return ChunkCopy(index, slots, first_token, None, None)
    layers, _, heads, _, dim = chunk.shape
    num_whole, lo = len(slots.whole_blocks), slots.start - first_token
    rows = chunk[:, :, :, lo:lo + num_whole * slots.block_size].reshape(
        layers, 2, heads, num_whole, slots.block_size, dim).transpose(0, 3, 2, 4, 1, 5)
    return ChunkCopy(index, slots, first_token, rows, slots.whole_blocks.numpy())


def copy_chunk_layer(copy: ChunkCopy, layer: int, chunk: np.ndarray, paged: torch.Tensor,
                     paged_np: np.ndarray | None, staging: torch.Tensor) -> None:
    """Write ``layer`` of a planned chunk into the blocks.

    ``paged_np`` is ``storage_view(paged.unflatten(-1, (2, dim)))`` for CPU blocks;
    ``staging`` a ``[2, heads, T, dim]`` CPU tensor for the other path.
    """
    if copy.rows is not None:
        paged_np[copy.blocks] = copy.rows[layer]
        return
    np.copyto(storage_view(staging), chunk[layer])
    scatter_layer(paged, staging, copy.slots, copy.first_token)


def gather_layer(paged: torch.Tensor, slots: Slots, out: torch.Tensor) -> None:
    """Copy tokens ``[slots.start, slots.end)`` out of the blocks into ``out``.

    ``out`` is ``[2, heads, end - start, dim]``.
    """
    heads, dim, bs = out.shape[1], out.shape[-1], slots.block_size
    num_whole, split = len(slots.whole_blocks), len(slots.whole_blocks) * bs
    if num_whole:
        rows = paged.index_select(0, slots.whole_blocks)  # [w, heads, bs, C], gathered
        rows = rows.transpose(0, 1).reshape(heads, split, 2 * dim)
        out[0, :, :split].copy_(rows[..., :dim], non_blocking=True)
        out[1, :, :split].copy_(rows[..., dim:], non_blocking=True)
    if len(slots.tail_blocks):
        rows = paged[slots.tail_blocks, :, slots.tail_offsets].transpose(0, 1)  # [heads, r, C]
        out[0, :, split:].copy_(rows[..., :dim], non_blocking=True)
        out[1, :, split:].copy_(rows[..., dim:], non_blocking=True)
