"""GPU decode of kvq objects: lane-parallel rANS and CDF expansion (Triton).

``decode_lanes`` decodes any number of lanes in one launch: the host concatenates
the sections' words (of one object or of many) and the lanes become one flat list,
lane ``l`` coding the global channels ``[l * cpl, (l + 1) * cpl)`` of the flat
``[sections * C, T]`` symbol array. Each program runs BLOCK lanes in lock-step, one
symbol per step, with a branch-free 7-step binary search over the lane's
129-entry CDF row.

Symbols are stored in "head layout" when ``out_dim`` is the head_dim D: channel
``g = section * C + head * D + d`` and token ``t`` go to
``((g // D) * T + t) * D + g % D``, i.e. ``[sections, heads, T, D]``, the order of
the decoded tensor, so dequantisation reads them without a transpose and, at one
step, neighbouring lanes store bytes ``cpl`` apart instead of ``cpl * T`` apart.
``out_dim=1`` gives the plain channel-major ``[sections * C, T]``.

``expand_cdfs`` is the integer CDF expansion of ``kvstore.codec.dist.expand_cdf``
as one kernel (one row of 128 symbols per channel, int32 arithmetic, same
integers), writing int16 or int32 rows.

The references are the CPU decoder ``kvstore.codec.rans.decode_flat`` (numba, wrapped
as ``kvstore.codec.gpu.decode_lanes_on_cpu``) and ``dist.expand_cdf``; tests compare
them value for value (under TRITON_INTERPRET=1 without a GPU). This module imports
nothing of the codec: the codec calls it.
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

PREC_BITS = 14  # == kvstore.codec.dist.PREC_BITS (checked by kvstore.codec.gpu)
MAX_SYMBOLS = 128  # == kvstore.codec.dist.MAX_SYMBOLS
STATE_LOW = 1 << 16
CDF_DTYPES = (torch.int16, torch.int32)  # CDF entries are 0..2**14
WORD_DTYPES = (torch.int16, torch.int32)  # int16 = the u16 words' bits


if triton is not None:

    @triton.jit
    def _kvq_decode_kernel(words_ptr, start_ptr, end_ptr, cdf_ptr, bins_ptr, out_ptr, ok_ptr,
                           num_lanes, num_tokens, cpl, out_dim,
                           BLOCK: tl.constexpr, PREC: tl.constexpr, MAXS: tl.constexpr,
                           LOG2_MAXS: tl.constexpr):
        lanes = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        live = lanes < num_lanes
        start = tl.load(start_ptr + lanes, mask=live, other=0)
        end = tl.load(end_ptr + lanes, mask=live, other=0)
        ok = live & (end - start >= 2)
        hi = tl.load(words_ptr + start, mask=ok, other=0).to(tl.int64) & 0xFFFF
        lo = tl.load(words_ptr + start + 1, mask=ok, other=0).to(tl.int64) & 0xFFFF
        x = (hi << 16) | lo
        pos = start + 2
        for k in range(0, cpl):
            chan = lanes * cpl + k
            row = chan * (MAXS + 1)
            alphabet = tl.load(bins_ptr + chan, mask=live, other=MAXS).to(tl.int64)
            dst = (chan // out_dim) * num_tokens * out_dim + chan % out_dim
            for t in range(0, num_tokens):
                slot = x & ((1 << PREC) - 1)
                # Branch-free search for cdf[s] <= slot < cdf[s + 1], carrying both
                # bounds: cdf[0] = 0 and cdf[MAXS] = 2**PREC are known, every later
                # bound is a probe already loaded. Entries at or past the alphabet
                # are 2**PREC, so their probes are not loaded.
                s = tl.zeros([BLOCK], dtype=tl.int64)
                c_lo = tl.zeros([BLOCK], dtype=tl.int64)
                c_hi = tl.full([BLOCK], 1 << PREC, dtype=tl.int64)
                for b in tl.static_range(LOG2_MAXS):
                    p = s + (MAXS >> (b + 1))
                    probe = tl.load(cdf_ptr + row + p, mask=ok & (p < alphabet),
                                    other=1 << PREC).to(tl.int64)
                    take = probe <= slot
                    s = tl.where(take, p, s)
                    c_lo = tl.where(take, probe, c_lo)
                    c_hi = tl.where(take, c_hi, probe)
                x = (c_hi - c_lo) * (x >> PREC) + slot - c_lo
                need = ok & (x < 65536)
                can = need & (pos < end)
                word = tl.load(words_ptr + pos, mask=can, other=0).to(tl.int64) & 0xFFFF
                x = tl.where(can, (x << 16) | word, x)
                pos = tl.where(can, pos + 1, pos)
                ok = ok & (can | ~need)
                tl.store(out_ptr + dst + t * out_dim, s.to(tl.uint8), mask=live)
        ok = ok & (x == 65536) & (pos == end)
        tl.store(ok_ptr + lanes, ok.to(tl.int32), mask=live)

    @triton.jit
    def _expand_cdf_kernel(weights_ptr, mu_ptr, ss_ptr, bins_ptr, cdf_ptr, num_rows,
                           ROWS: tl.constexpr, MAXS: tl.constexpr, PREC: tl.constexpr,
                           SCALES: tl.constexpr, DQ: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        live = rows < num_rows
        mu = tl.load(mu_ptr + rows, mask=live, other=0).to(tl.int32)
        ss = tl.load(ss_ptr + rows, mask=live, other=0).to(tl.int32)
        a = tl.load(bins_ptr + rows, mask=live, other=2).to(tl.int32)
        ks = tl.arange(0, MAXS)
        mu4 = (mu * (4 * (a - 1)) + 127) // 255  # dist.mu4_of
        dq = tl.minimum(tl.abs(4 * ks[None, :] - mu4[:, None]), DQ - 1)
        valid = (ks[None, :] < a[:, None]) & live[:, None]
        table = ((ss >> 7) * SCALES + (ss & 127)) * DQ
        w = tl.load(weights_ptr + table[:, None] + dq, mask=valid, other=0)
        total = tl.maximum(tl.sum(w, axis=1), 1)  # >= a for a live row
        freq = tl.where(valid, 1 + (w * ((1 << PREC) - a)[:, None]) // total[:, None], 0)
        left = (1 << PREC) - tl.sum(freq, axis=1)
        top = tl.argmax(w, axis=1, tie_break_left=True)  # numpy argmax: first maximum
        freq += tl.where(ks[None, :] == top[:, None], left[:, None], 0)
        cdf = tl.cumsum(freq, axis=1)
        base = cdf_ptr + rows * (MAXS + 1)
        tl.store(base[:, None] + 1 + ks[None, :], cdf.to(cdf_ptr.dtype.element_ty),
                 mask=live[:, None])
        tl.store(base, tl.zeros([ROWS], dtype=cdf_ptr.dtype.element_ty), mask=live)


def launch_decode_lanes(words: torch.Tensor, lane_start: torch.Tensor, lane_end: torch.Tensor,
                        cdf: torch.Tensor, channels_per_lane: int, num_tokens: int,
                        out_dim: int = 1, block: int = 64,
                        num_symbols: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Queue the decode of all lanes; no host synchronisation.

    Args:
        words: ``[W]`` rANS words, all lanes concatenated: int16 (the u16 bits) or
            int32 (0..65535).
        lane_start, lane_end: ``[N]`` int64 word offsets of each lane.
        cdf: ``[C, MAX_SYMBOLS + 1]`` int16/int32 per-channel CDFs, C = N * channels_per_lane,
            as ``dist.expand_cdf`` makes them: 0 first, ``2**PREC_BITS`` from the
            alphabet size on, increasing in between.
        out_dim: 1 for symbols ``[C, T]``; the head_dim D (dividing C) for
            ``[C // D, T, D]`` (see the module docstring).
        num_symbols: ``[C]`` uint8 alphabet sizes; None counts them from ``cdf``.

    Returns:
        (symbols, ok): ``[C * T]`` uint8 and ``[N]`` int32, 1 where a lane's stream
        ended exactly where it should (the CPU decoder's check).
    """
    num_lanes = lane_start.shape[0]
    check_tensor("words", words, ndim=1, dtypes=WORD_DTYPES)
    check_tensor("lane_start", lane_start, ndim=1, dtypes=(torch.int64,))
    check_tensor("lane_end", lane_end, ndim=1, dtypes=(torch.int64,), shape=(num_lanes,))
    check_tensor("cdf", cdf, ndim=2, dtypes=CDF_DTYPES,
                 shape=(num_lanes * channels_per_lane, MAX_SYMBOLS + 1))
    check_same_device(words=words, lane_start=lane_start, lane_end=lane_end, cdf=cdf)
    require_triton(words)
    if out_dim < 1 or cdf.shape[0] % out_dim:
        raise InvalidArgument(f"out_dim {out_dim} does not divide {cdf.shape[0]} channels")
    if block < 1 or block & (block - 1):
        raise InvalidArgument(f"block must be a power of two, got {block}")
    if num_symbols is None:
        num_symbols = (cdf < (1 << PREC_BITS)).sum(1).to(torch.uint8)
    check_tensor("num_symbols", num_symbols, ndim=1, dtypes=(torch.uint8,), shape=(cdf.shape[0],))
    check_same_device(words=words, num_symbols=num_symbols)
    out = torch.empty(cdf.shape[0] * num_tokens, dtype=torch.uint8, device=words.device)
    ok = torch.empty(num_lanes, dtype=torch.int32, device=words.device)
    if num_lanes == 0:
        return out, ok
    grid = (triton.cdiv(num_lanes, block),)
    _kvq_decode_kernel[grid](words, lane_start, lane_end, cdf, num_symbols, out, ok, num_lanes,
                             num_tokens, channels_per_lane, out_dim, BLOCK=block, PREC=PREC_BITS,
                             MAXS=MAX_SYMBOLS, LOG2_MAXS=MAX_SYMBOLS.bit_length() - 1,
                             num_warps=max(1, min(8, block // 32)))
    return out, ok


def decode_lanes_triton(words: torch.Tensor, lane_start: torch.Tensor, lane_end: torch.Tensor,
                        cdf: torch.Tensor, channels_per_lane: int, num_tokens: int,
                        block: int = 64) -> tuple[torch.Tensor, bool]:
    """Decode all lanes on the device: (symbols ``[C, T]`` uint8, all lanes intact).

    Checks the lane ends against the words given (one host synchronisation);
    ``launch_decode_lanes`` is the asynchronous form the object decoder uses.
    """
    num_lanes = lane_start.shape[0]
    if num_lanes and int(lane_end.max()) > words.shape[0]:
        raise InvalidArgument(f"lane ends exceed the {words.shape[0]} words given")
    out, ok = launch_decode_lanes(words, lane_start, lane_end, cdf, channels_per_lane,
                                  num_tokens, 1, block)
    return out.view(cdf.shape[0], num_tokens), bool(ok.all())


_WEIGHTS: dict[torch.device, torch.Tensor] = {}


def expand_cdfs(mu: torch.Tensor, shape_scale: torch.Tensor, num_symbols: torch.Tensor,
                weights_table: np.ndarray, dtype: torch.dtype = torch.int16,
                rows_per_program: int = 16) -> torch.Tensor:
    """``dist.expand_cdf`` on the device: ``[C, MAX_SYMBOLS + 1]`` CDFs in ``dtype``.

    Args:
        mu, shape_scale: ``[C]`` uint8 distribution bytes.
        num_symbols: ``[C]`` uint8 alphabet sizes, each in 2..MAX_SYMBOLS.
        weights_table: ``kvstore.codec.dist.WEIGHTS`` (copied to each device once).
    """
    n = mu.shape[0]
    for name, t in (("mu", mu), ("shape_scale", shape_scale), ("num_symbols", num_symbols)):
        check_tensor(name, t, ndim=1, dtypes=(torch.uint8,), shape=(n,))
    check_same_device(mu=mu, shape_scale=shape_scale, num_symbols=num_symbols)
    require_triton(mu)
    if dtype not in CDF_DTYPES:
        raise InvalidArgument(f"CDF dtype must be one of {CDF_DTYPES}, got {dtype}")
    weights = _WEIGHTS.get(mu.device)
    if weights is None:
        weights = _WEIGHTS[mu.device] = torch.from_numpy(weights_table.copy()).to(mu.device)
    cdf = torch.empty((n, MAX_SYMBOLS + 1), dtype=dtype, device=mu.device)
    if n:
        shapes, scales, dq = weights_table.shape
        grid = (triton.cdiv(n, rows_per_program),)
        _expand_cdf_kernel[grid](weights, mu, shape_scale, num_symbols, cdf, n,
                                 ROWS=rows_per_program, MAXS=MAX_SYMBOLS, PREC=PREC_BITS,
                                 SCALES=scales, DQ=dq)
    return cdf


_HADAMARD: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}


def hadamard(dim: int, device: torch.device | str, dtype: torch.dtype = torch.float32
             ) -> torch.Tensor:
    """Normalised ``[dim, dim]`` Walsh-Hadamard matrix (symmetric, its own inverse); cached."""
    key = (dim, torch.device(device), dtype)
    h = _HADAMARD.get(key)
    if h is None:
        h = torch.ones((1, 1), dtype=dtype, device=device)
        while h.shape[0] < dim:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        h = _HADAMARD[key] = h / float(np.sqrt(dim))
    return h
