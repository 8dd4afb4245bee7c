"""Copy rows of 32-bit words device to device and sum them with the device checksum, in one pass.

The client's GPU path copies each leased chunk's payload out of the daemon's slab
into its KV tensor. A payload is ``[layers, 2, heads, T, dim]``; each (layer, K|V,
head) row of ``T * dim`` elements is contiguous in the slab *and* in the output
(``[layers, 2, heads, tokens, dim]``, chunk ``c`` at tokens ``c*T .. (c+1)*T``), so the
copy is a list of equal-length rows. The kernel reads each word once, writes it
(unless the row's layer was not asked for, ``row_dst < 0``) and adds it to the
row's ``kvstore.device_checksum`` sum: word ``j`` of a row contributes
``w * (2 * (row_start + j) * 0x9E3779B9 + 1)`` modulo 2**64. Separate passes (copy,
make contiguous, widen, multiply, reduce) read and wrote the bytes about eight
times over.

Arithmetic is int64 throughout: two's-complement add and multiply wrap exactly
like the unsigned sum modulo 2**64.
"""

from __future__ import annotations

import torch
from kvstore.kernels.sparse_common import (
    INDEX_DTYPES,
    check_same_device,
    check_tensor,
    require_triton,
    tl,
    triton,
)

from kvstore.device_checksum import MULTIPLIER
from kvstore.errors import InvalidArgument

_BLOCK = 1024  # words per program


def copy_rows_reference(src: torch.Tensor, dst: torch.Tensor, row_src: torch.Tensor,
                        row_dst: torch.Tensor, row_start: torch.Tensor,
                        row_words: int) -> torch.Tensor:
    """``dst[row_dst[r]:][:row_words] = src[row_src[r]:][:row_words]`` (rows with
    ``row_dst < 0`` are not written); returns each row's checksum, int64 ``[R]``."""
    span = torch.arange(row_words, device=src.device)
    words = src[row_src.long()[:, None] + span]  # [R, row_words] int32
    keep = row_dst >= 0
    if bool(keep.any()):
        dst[row_dst[keep].long()[:, None] + span] = words[keep]
    unsigned = words.to(torch.int64) & 0xFFFFFFFF
    weights = (row_start.long()[:, None] + span) * MULTIPLIER + 1
    return (unsigned * weights).sum(1)


if triton is not None:

    @triton.jit
    def _copy_rows_kernel(src_ptr, dst_ptr, row_src_ptr, row_dst_ptr, row_start_ptr,
                          partial_ptr, row_words, num_blocks, multiplier,
                          BLOCK: tl.constexpr):
        row = tl.program_id(0)
        blk = tl.program_id(1)
        src0 = tl.load(row_src_ptr + row).to(tl.int64)
        dst0 = tl.load(row_dst_ptr + row).to(tl.int64)
        start = tl.load(row_start_ptr + row).to(tl.int64)
        idx = blk * BLOCK + tl.arange(0, BLOCK)
        mask = idx < row_words
        words = tl.load(src_ptr + src0 + idx, mask=mask, other=0)
        if dst0 >= 0:  # rows of layers not asked for are summed, not copied
            tl.store(dst_ptr + dst0 + idx, words, mask=mask)
        unsigned = words.to(tl.uint32, bitcast=True).to(tl.int64)
        weights = (start + idx.to(tl.int64)) * multiplier + 1
        tl.store(partial_ptr + row * num_blocks + blk, tl.sum(unsigned * weights, axis=0))


def copy_rows_triton(src: torch.Tensor, dst: torch.Tensor, row_src: torch.Tensor,
                     row_dst: torch.Tensor, row_start: torch.Tensor,
                     row_words: int) -> torch.Tensor:
    """The Triton version of ``copy_rows_reference`` (same arguments and result)."""
    check_tensor("src", src, ndim=1, dtypes=(torch.int32,))
    check_tensor("dst", dst, ndim=1, dtypes=(torch.int32,))
    num_rows = row_src.shape[0]
    for name, t in (("row_src", row_src), ("row_dst", row_dst), ("row_start", row_start)):
        check_tensor(name, t, ndim=1, dtypes=INDEX_DTYPES, shape=(num_rows,))
    check_same_device(src=src, dst=dst, row_src=row_src, row_dst=row_dst, row_start=row_start)
    if row_words <= 0:
        raise InvalidArgument(f"row_words must be positive, got {row_words}")
    require_triton(src, dst)
    num_blocks = triton.cdiv(row_words, _BLOCK)
    partial = torch.empty(num_rows, num_blocks, dtype=torch.int64, device=src.device)
    if num_rows:
        _copy_rows_kernel[(num_rows, num_blocks)](
            src, dst, row_src, row_dst, row_start, partial, row_words, num_blocks,
            MULTIPLIER, BLOCK=_BLOCK)
    return partial.sum(1)


def copy_rows(src: torch.Tensor, dst: torch.Tensor, row_src: torch.Tensor,
              row_dst: torch.Tensor, row_start: torch.Tensor, row_words: int) -> torch.Tensor:
    """Triton on CUDA tensors, the reference elsewhere."""
    if src.is_cuda and triton is not None:
        return copy_rows_triton(src, dst, row_src, row_dst, row_start, row_words)
    return copy_rows_reference(src, dst, row_src, row_dst, row_start, row_words)
