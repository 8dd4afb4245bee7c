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

import torch

from kvstore.errors import InvalidArgument

# kvstore layout dtype name <-> torch dtype, for the engine connectors.
TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
DTYPE_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}


@dataclass(frozen=True, slots=True)
class Slots:
    """Where tokens ``[start, end)`` of one request sit in the paged KV."""

    start: int  # first token (inclusive)
    end: int  # last token (exclusive)
    blocks: torch.Tensor  # [end - start] int64: block id of each token
    offsets: torch.Tensor  # [end - start] int64: offset of each token inside its block


def slots_of(block_ids: Sequence[int], block_size: int, start: int, end: int,
             device: torch.device | str = "cpu") -> Slots:
    """The block and offset of tokens ``[start, end)`` given the request's block table."""
    needed = -(-end // block_size)
    if not 0 <= start <= end or needed > len(block_ids):
        raise InvalidArgument(f"tokens [{start}, {end}) need {needed} blocks of {block_size}, "
                              f"the request has {len(block_ids)}")
    tokens = torch.arange(start, end, dtype=torch.int64)
    table = torch.as_tensor(list(block_ids[:needed]), dtype=torch.int64)
    return Slots(start, end, table[tokens // block_size].to(device),
                 (tokens % block_size).to(device))


def check_paged(paged: torch.Tensor, num_kv_heads: int, head_dim: int, block_size: int) -> None:
    """Raise unless ``paged`` is ``[blocks, heads, block_size, 2 * head_dim]``."""
    shape = tuple(paged.shape)
    if len(shape) != 4 or shape[1:] != (num_kv_heads, block_size, 2 * head_dim):
        raise InvalidArgument(
            f"paged KV is {shape}, expected [num_blocks, {num_kv_heads}, {block_size}, "
            f"{2 * head_dim}] (heads, block size, K and V head sizes of the KV cache spec)")


def scatter_layer(paged: torch.Tensor, kv: torch.Tensor, slots: Slots) -> None:
    """Write tokens ``[slots.start, slots.end)`` of ``kv`` ([2, heads, n, dim]) into blocks.

    ``kv`` holds tokens from 0 (a stored prefix), so only its tail from
    ``slots.start`` is written; earlier tokens are the engine's own prefix-cache hit.
    """
    head_dim = kv.shape[-1]
    kv = kv.to(device=paged.device, non_blocking=True)
    # paged[blocks, :, offsets] is [n, heads, C]: advanced indices first, then the heads.
    paged[slots.blocks, :, slots.offsets, :head_dim] = \
        kv[0, :, slots.start:slots.end].transpose(0, 1)
    paged[slots.blocks, :, slots.offsets, head_dim:] = \
        kv[1, :, slots.start:slots.end].transpose(0, 1)


def gather_layer(paged: torch.Tensor, slots: Slots, out: torch.Tensor) -> None:
    """Copy tokens ``[slots.start, slots.end)`` out of the blocks into ``out`` ([2, heads, n, dim])."""
    head_dim = out.shape[-1]
    rows = paged[slots.blocks, :, slots.offsets]  # [n, heads, C], a gathered copy
    out[0].copy_(rows[..., :head_dim].transpose(0, 1), non_blocking=True)
    out[1].copy_(rows[..., head_dim:].transpose(0, 1), non_blocking=True)
