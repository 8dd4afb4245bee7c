"""GPU decode of kvq objects: lane-parallel rANS (Triton) and dequantisation (torch).

The kernel decodes the lanes of every section of an object at once: the host
concatenates the sections' words and the lanes become one flat list, lane ``l``
coding channels ``[l * cpl, (l + 1) * cpl)`` of the flat ``[sections * C, T]``
symbol array. Each program runs BLOCK lanes in lock-step, one symbol per step, with
a branch-free 7-step binary search over the lane's 129-entry CDF row.

The reference is the CPU decoder ``kvstore.codec.rans.decode_flat`` (numba) on the
same flat arrays; ``decode_lanes_reference`` wraps it for torch tensors and tests
compare the two symbol for symbol (under TRITON_INTERPRET=1 without a GPU).
"""

from __future__ import annotations

import numpy as np
import torch
from kvstore.kernels.sparse_common import (
    check_same_device,
    check_tensor,
    require_triton,
    tl,
    triton,
)

from kvstore.errors import InvalidArgument

PREC_BITS = 14  # == kvstore.codec.dist.PREC_BITS (checked by the launcher)
MAX_SYMBOLS = 128  # == kvstore.codec.dist.MAX_SYMBOLS
STATE_LOW = 1 << 16


def decode_lanes_reference(words: torch.Tensor, lane_start: torch.Tensor,
                           lane_end: torch.Tensor, cdf: torch.Tensor, channels_per_lane: int,
                           num_tokens: int) -> tuple[torch.Tensor, bool]:
    """CPU reference: (symbols ``[C, T]`` uint8, all lanes intact)."""
    from kvstore.codec.rans import decode_flat

    symct = decode_flat(words.cpu().numpy().astype(np.uint16), lane_start.cpu().numpy(),
                        lane_end.cpu().numpy(), cdf.cpu().numpy().astype(np.int32),
                        channels_per_lane, num_tokens, MAX_SYMBOLS)
    if symct is None:
        return torch.zeros((cdf.shape[0], num_tokens), dtype=torch.uint8), False
    return torch.from_numpy(symct), True


if triton is not None:

    @triton.jit
    def _kvq_decode_kernel(words_ptr, start_ptr, end_ptr, cdf_ptr, out_ptr, ok_ptr,
                           num_lanes, num_tokens, cpl,
                           BLOCK: tl.constexpr, PREC: tl.constexpr, MAXS: tl.constexpr,
                           LOG2_MAXS: tl.constexpr):
        lanes = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        live = lanes < num_lanes
        start = tl.load(start_ptr + lanes, mask=live, other=0)
        end = tl.load(end_ptr + lanes, mask=live, other=0)
        ok = live & (end - start >= 2)
        hi = tl.load(words_ptr + start, mask=ok, other=0).to(tl.int64)
        lo = tl.load(words_ptr + start + 1, mask=ok, other=0).to(tl.int64)
        x = (hi << 16) | lo
        pos = start + 2
        for j in range(0, cpl * num_tokens):
            chan = lanes * cpl + j // num_tokens
            row = chan * (MAXS + 1)
            slot = x & ((1 << PREC) - 1)
            s = tl.zeros([BLOCK], dtype=tl.int64)
            for b in tl.static_range(LOG2_MAXS):
                half = MAXS >> (b + 1)
                probe = tl.load(cdf_ptr + row + s + half, mask=ok, other=1 << PREC)
                s += tl.where(probe <= slot, half, 0)
            c0 = tl.load(cdf_ptr + row + s, mask=ok, other=0).to(tl.int64)
            c1 = tl.load(cdf_ptr + row + s + 1, mask=ok, other=1).to(tl.int64)
            x = (c1 - c0) * (x >> PREC) + slot - c0
            need = ok & (x < 65536)
            can = need & (pos < end)
            word = tl.load(words_ptr + pos, mask=can, other=0).to(tl.int64)
            x = tl.where(can, (x << 16) | word, x)
            pos = tl.where(can, pos + 1, pos)
            ok = ok & (can | ~need)
            tl.store(out_ptr + chan * num_tokens + j % num_tokens, s.to(tl.uint8), mask=live)
        ok = ok & (x == 65536) & (pos == end)
        tl.store(ok_ptr + lanes, ok.to(tl.int32), mask=live)


def decode_lanes_triton(words: torch.Tensor, lane_start: torch.Tensor, lane_end: torch.Tensor,
                        cdf: torch.Tensor, channels_per_lane: int, num_tokens: int,
                        block: int = 64) -> tuple[torch.Tensor, bool]:
    """Decode all lanes on the device: (symbols ``[C, T]`` uint8, all lanes intact).

    Args:
        words: ``[W]`` int32 rANS words (0..65535), all lanes concatenated.
        lane_start, lane_end: ``[N]`` int64 word offsets of each lane.
        cdf: ``[C, MAX_SYMBOLS + 1]`` int32 per-channel CDFs, C = N * channels_per_lane.
    """
    from kvstore.codec import dist

    if dist.PREC_BITS != PREC_BITS or dist.MAX_SYMBOLS != MAX_SYMBOLS:
        raise InvalidArgument("kernel constants disagree with kvstore.codec.dist")
    num_lanes = lane_start.shape[0]
    check_tensor("words", words, ndim=1, dtypes=(torch.int32,))
    check_tensor("lane_start", lane_start, ndim=1, dtypes=(torch.int64,))
    check_tensor("lane_end", lane_end, ndim=1, dtypes=(torch.int64,), shape=(num_lanes,))
    check_tensor("cdf", cdf, ndim=2, dtypes=(torch.int32,),
                 shape=(num_lanes * channels_per_lane, MAX_SYMBOLS + 1))
    check_same_device(words=words, lane_start=lane_start, lane_end=lane_end, cdf=cdf)
    require_triton(words)
    if num_lanes and int(lane_end.max()) > words.shape[0]:
        raise InvalidArgument(f"lane ends exceed the {words.shape[0]} words given")
    out = torch.empty((cdf.shape[0], num_tokens), dtype=torch.uint8, device=words.device)
    ok = torch.empty(num_lanes, dtype=torch.int32, device=words.device)
    if num_lanes == 0:
        return out, True
    grid = (triton.cdiv(num_lanes, block),)
    _kvq_decode_kernel[grid](words, lane_start, lane_end, cdf, out, ok, num_lanes, num_tokens,
                             channels_per_lane, BLOCK=block, PREC=PREC_BITS, MAXS=MAX_SYMBOLS,
                             LOG2_MAXS=MAX_SYMBOLS.bit_length() - 1)
    return out, bool(ok.all())


def hadamard(dim: int, device: torch.device | str, dtype: torch.dtype = torch.float32
             ) -> torch.Tensor:
    """Normalised ``[dim, dim]`` Walsh-Hadamard matrix (symmetric, its own inverse)."""
    h = torch.ones((1, 1), dtype=dtype, device=device)
    while h.shape[0] < dim:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / float(np.sqrt(dim))
