"""Hit/miss diff of a new chunk selection against the chunks already resident.

Per kv head the resident buffer has ``S`` slots. ``block_slot[h, b]`` is the slot
holding block ``b`` (-1: not resident) and ``slot_block[h, s]`` its inverse
(-1: empty). For a new selection ``selected[h, :K]`` (distinct block ids, K <= S)
the diff gives each missed block a slot that holds no selected block, in order
(the i-th miss takes the i-th such slot), and updates both tables in place.
Hits keep their slot, so a block that stays selected is never fetched again.
"""

from __future__ import annotations

import torch
from kvstore.kernels.sparse_common import (
    check_same_device,
    check_tensor,
    next_pow2,
    require_triton,
    tl,
    triton,
)

from kvstore.errors import InvalidArgument


def diff_reference(selected: torch.Tensor, block_slot: torch.Tensor,
                   slot_block: torch.Tensor) -> torch.Tensor:
    """Returns ``miss_slot [H, K]`` (int64; -1 where the block was a hit); updates tables."""
    num_heads, num_selected = selected.shape
    miss_slot = torch.full((num_heads, num_selected), -1, dtype=torch.int64,
                           device=selected.device)
    for h in range(num_heads):
        sel = selected[h].long()
        current = block_slot[h, sel].long()
        hit = current >= 0
        kept = torch.zeros(slot_block.shape[1], dtype=torch.bool, device=selected.device)
        kept[current[hit]] = True
        free = (~kept).nonzero().flatten()
        misses = (~hit).nonzero().flatten()
        slots = free[: misses.numel()]
        miss_slot[h, misses] = slots
        old = slot_block[h, slots].long()
        block_slot[h, old[old >= 0]] = -1
        block_slot[h, sel[misses]] = slots.to(block_slot.dtype)
        slot_block[h, slots] = sel[misses].to(slot_block.dtype)
    return miss_slot


if triton is not None:

    @triton.jit
    def _diff_kernel(sel_ptr, block_slot_ptr, slot_block_ptr, miss_slot_ptr, K, S, NB,
                     BK: tl.constexpr, BS: tl.constexpr):
        h = tl.program_id(0)
        k = tl.arange(0, BK)
        s = tl.arange(0, BS)
        in_k = k < K
        sel = tl.load(sel_ptr + h * K + k, mask=in_k, other=0)
        cur = tl.load(block_slot_ptr + h * NB + sel, mask=in_k, other=-1).to(tl.int64)
        hit = (cur >= 0) & in_k
        miss = (cur < 0) & in_k
        held = (cur[:, None] == s[None, :]) & hit[:, None]  # [BK, BS]
        kept = tl.max(held.to(tl.int32), axis=0)
        free = (kept == 0) & (s < S)
        free_rank = tl.cumsum(free.to(tl.int32), 0) - 1
        miss_rank = tl.cumsum(miss.to(tl.int32), 0) - 1
        match = (free_rank[None, :] == miss_rank[:, None]) & free[None, :] & miss[:, None]
        slot = tl.sum(tl.where(match, s[None, :], 0), axis=1).to(tl.int64)
        slot = tl.where(miss, slot, -1)
        tl.store(miss_slot_ptr + h * K + k, slot, mask=in_k)
        old = tl.load(slot_block_ptr + h * S + slot, mask=miss, other=-1)
        tl.debug_barrier()
        tl.store(block_slot_ptr + h * NB + old, -1, mask=miss & (old >= 0))
        tl.debug_barrier()
        tl.store(block_slot_ptr + h * NB + sel, slot, mask=miss)
        tl.store(slot_block_ptr + h * S + slot, sel, mask=miss)


def diff_triton(selected: torch.Tensor, block_slot: torch.Tensor,
                slot_block: torch.Tensor) -> torch.Tensor:
    """Triton version of :func:`diff_reference` (one program per kv head)."""
    check_tensor("selected", selected, ndim=2, dtypes=(torch.int64,))
    num_heads, num_selected = selected.shape
    check_tensor("block_slot", block_slot, ndim=2, dtypes=(torch.int64,), shape=(num_heads, None))
    check_tensor("slot_block", slot_block, ndim=2, dtypes=(torch.int64,), shape=(num_heads, None))
    num_slots = slot_block.shape[1]
    if num_selected > num_slots:
        raise InvalidArgument(f"selected {num_selected} blocks but only {num_slots} slots")
    check_same_device(selected=selected, block_slot=block_slot, slot_block=slot_block)
    require_triton(selected)
    miss_slot = torch.empty_like(selected)
    if num_selected == 0:
        return miss_slot
    _diff_kernel[(num_heads,)](selected, block_slot, slot_block, miss_slot,
                               num_selected, num_slots, block_slot.shape[1],
                               BK=next_pow2(num_selected), BS=next_pow2(num_slots))
    return miss_slot


def diff(selected: torch.Tensor, block_slot: torch.Tensor,
         slot_block: torch.Tensor) -> torch.Tensor:
    """Dispatch: the Triton kernel on CUDA, the PyTorch reference elsewhere."""
    if selected.is_cuda and triton is not None:
        return diff_triton(selected, block_slot, slot_block)
    return diff_reference(selected, block_slot, slot_block)
