"""The fused copy + device-checksum kernel against its reference and the checksum itself.

Lives beside the other kernel tests so the conftest here runs Triton interpreted
without a GPU (natively with one)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kvstore.kernels.chunk_copy import copy_rows_reference, copy_rows_triton

from kvstore.device_checksum import checksum_reference
from kvstore.errors import InvalidArgument

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu = interpreted


def _case(seed: int, row_words: int):
    gen = np.random.default_rng(seed)
    src = torch.from_numpy(gen.integers(-2**31, 2**31, 6 * row_words + 5, dtype=np.int64)
                           .astype(np.int32))
    row_src = torch.tensor([5, 5 + row_words, 3 * row_words, 4 * row_words + 1])
    row_dst = torch.tensor([0, -1, 2 * row_words, row_words])  # row 1 is summed, not copied
    row_start = torch.tensor([12, 12 + row_words, 7, 0])
    return src, row_src, row_dst, row_start


@pytest.mark.parametrize("row_words", [1, 5, 1024, 2500])
def test_kernel_copies_and_sums_like_the_reference(row_words: int) -> None:
    src, row_src, row_dst, row_start = _case(row_words, row_words)
    want_dst = torch.zeros(3 * row_words, dtype=torch.int32)
    want = copy_rows_reference(src, want_dst, row_src, row_dst, row_start, row_words)
    got_dst = torch.zeros(3 * row_words, dtype=torch.int32, device=DEVICE)
    got = copy_rows_triton(src.to(DEVICE), got_dst, row_src.to(DEVICE), row_dst.to(DEVICE),
                           row_start.to(DEVICE), row_words)
    assert torch.equal(got.cpu(), want)
    assert torch.equal(got_dst.cpu(), want_dst)


def test_reference_row_sums_are_device_checksums_at_their_start() -> None:
    src, row_src, row_dst, row_start = _case(3, 64)
    sums = copy_rows_reference(src, torch.zeros(192, dtype=torch.int32), row_src, row_dst,
                               row_start, 64)
    for r in range(4):
        row = src[int(row_src[r]) : int(row_src[r]) + 64].numpy().tobytes()
        assert int(sums[r]) % (1 << 64) == checksum_reference(row, int(row_start[r]))


def test_kernel_rejects_non_int32_words() -> None:
    src = torch.zeros(8, dtype=torch.float32, device=DEVICE)
    idx = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    with pytest.raises(InvalidArgument, match="src"):
        copy_rows_triton(src, torch.zeros(8, dtype=torch.int32, device=DEVICE), idx, idx, idx, 4)
