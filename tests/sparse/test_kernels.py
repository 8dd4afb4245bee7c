"""Each sparse Triton kernel against its PyTorch reference (interpreted on CPU in CI)."""

from __future__ import annotations

import pytest
import torch
from kvstore.kernels import sparse_diff, sparse_gather, sparse_rebuild, sparse_score

from kvstore.errors import InvalidArgument

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROPE = (1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16)), 1.0)


@pytest.mark.parametrize("block_tokens", [1, 8])
def test_block_scores_match_reference_for_landmarks_and_blocks(block_tokens: int) -> None:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(6, 16, generator=gen).to(DEVICE)
    keys = torch.randn(2, 5, block_tokens, 16, generator=gen).to(DEVICE)
    want = sparse_score.block_scores_reference(q, keys, 0.25)
    got = sparse_score.block_scores_triton(q, keys, 0.25)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_block_scores_reject_head_mismatch() -> None:
    with pytest.raises(InvalidArgument, match="multiple"):
        sparse_score.block_scores_triton(torch.zeros(5, 16), torch.zeros(2, 3, 8, 16), 1.0)


def _tables(num_heads: int, num_blocks: int, num_slots: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    block_slot = torch.full((num_heads, num_blocks), -1, dtype=torch.int64)
    slot_block = torch.full((num_heads, num_slots), -1, dtype=torch.int64)
    for h in range(num_heads):  # a partly filled resident set
        resident = torch.randperm(num_blocks, generator=gen)[: num_slots - 1]
        slot_block[h, : num_slots - 1] = resident
        block_slot[h, resident] = torch.arange(num_slots - 1)
    return block_slot, slot_block


def test_diff_matches_reference_and_keeps_hits() -> None:
    block_slot, slot_block = _tables(3, 40, 6, seed=1)
    gen = torch.Generator().manual_seed(2)
    selected = torch.stack([torch.randperm(40, generator=gen)[:5] for _ in range(3)])
    selected[0, :2] = slot_block[0, :2]  # force some hits
    ref_tables = (block_slot.clone(), slot_block.clone())
    want = sparse_diff.diff_reference(selected, *ref_tables)
    tri_tables = (block_slot.clone().to(DEVICE), slot_block.clone().to(DEVICE))
    got = sparse_diff.diff_triton(selected.to(DEVICE), *tri_tables)
    assert torch.equal(got.cpu(), want)
    assert torch.equal(tri_tables[0].cpu(), ref_tables[0])
    assert torch.equal(tri_tables[1].cpu(), ref_tables[1])
    assert (want[0, :2] == -1).all()  # hits stay where they are
    for h in range(3):  # every selected block is now resident exactly once
        assert set(ref_tables[1][h].tolist()) >= set(selected[h].tolist())


def test_diff_rejects_more_selected_than_slots() -> None:
    block_slot, slot_block = _tables(1, 10, 2, seed=0)
    with pytest.raises(InvalidArgument, match="slots"):
        sparse_diff.diff_triton(torch.arange(3).view(1, 3), block_slot, slot_block)


@pytest.mark.parametrize("with_rope", [False, True])
def test_gather_matches_reference_with_and_without_rope(with_rope: bool) -> None:
    gen = torch.Generator().manual_seed(3)
    num_heads, num_blocks, block_tokens, dim = 2, 12, 8, 16
    src = torch.randn(num_heads * num_blocks * block_tokens * dim, generator=gen).half()
    offsets = (torch.randperm(num_heads * num_blocks, generator=gen)
               .view(num_heads, num_blocks) * block_tokens * dim)
    blocks = torch.tensor([[3, 7, 0, 11], [5, 1, 2, 9]])
    slots = torch.tensor([[2, -1, 0, 4], [-1, 3, 1, 0]])
    rope = ROPE if with_rope else None
    want = torch.zeros(num_heads, 5, block_tokens, dim)
    sparse_gather.gather_reference(src, offsets, blocks, slots, want, rope)
    got = torch.zeros(num_heads, 5, block_tokens, dim, device=DEVICE)
    sparse_gather.gather_triton(src.to(DEVICE), offsets.to(DEVICE), blocks.to(DEVICE),
                                slots.to(DEVICE), got, rope)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)
    assert want[0, 1].abs().sum() == 0 and want[0, 2].abs().sum() > 0


def test_gather_rejects_offsets_of_wrong_dtype() -> None:
    with pytest.raises(InvalidArgument, match="offsets"):
        sparse_gather.gather_triton(torch.zeros(64), torch.zeros(1, 2, dtype=torch.int32),
                                    torch.zeros(1, 1, dtype=torch.int64),
                                    torch.zeros(1, 1, dtype=torch.int64), torch.zeros(1, 1, 8, 4))


def test_rebuild_matches_reference() -> None:
    gen = torch.Generator().manual_seed(4)
    num_heads, block_tokens, dim, rank = 2, 8, 16, 12
    coeffs = torch.randn(10 * block_tokens, rank, generator=gen)
    basis = torch.linalg.qr(torch.randn(num_heads * dim, rank, generator=gen))[0].T.contiguous()
    blocks = torch.tensor([[9, 2, 4], [0, 6, 3]])
    slots = torch.tensor([[1, 0, -1], [2, -1, 0]])
    want = torch.zeros(num_heads, 3, block_tokens, dim)
    sparse_rebuild.rebuild_reference(coeffs, basis, blocks, slots, want, ROPE)
    got = torch.zeros(num_heads, 3, block_tokens, dim, device=DEVICE)
    sparse_rebuild.rebuild_triton(coeffs.to(DEVICE), basis.to(DEVICE), blocks.to(DEVICE),
                                  slots.to(DEVICE), got, ROPE)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)
    # the reference itself: full-rank factors rebuild exact keys, rotated
    keys = coeffs @ basis
    exact = sparse_gather.rope_rotate_reference(
        keys[9 * 8 : 10 * 8, :dim], torch.arange(72, 80), *ROPE)
    torch.testing.assert_close(want[0, 1], exact, rtol=1e-5, atol=1e-5)
