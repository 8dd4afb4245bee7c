"""Quantisers of the kvq codec, compiled with numba (a few fused passes per section).

Keys: asymmetric uniform quantisation per channel (over the chunk's tokens), no
rotation. Values: a normalised Walsh-Hadamard rotation over head_dim, then symmetric
uniform quantisation per (head, token). Measured on SmolLM2 KV (1024-token prefix,
ppl of the next 512, ideal entropy): keys asymmetric per channel + values rotated
per token beat every other mix tried — e.g. K 15 bins / V 7 bins: 2.77 bits at
+0.70% ppl, vs +2.2% with keys rotated too and +5.2% with both symmetric; a single
step per head (no per-channel ranges) was far worse (+16% at 2.56 bits).

Side information is a float32 base per section plus one byte per scale: the scale
is ``base * 2**(-code/16)`` (``RATIO[code]``, a constant table), rounded so it
always covers the data (no clipping). Key minima are float16, rounded down. With a
calibration table the key ranges handed to quantize_keys are widened per channel
(weighted_key_ranges) so that steps follow the queries; the decoder cannot tell.

Symbols come out ``[channels, tokens]`` uint8 (channel = head * head_dim + d), the
order the lane coder takes, with per-channel histograms for fitting distributions
(a separate pass, so the quantising loops stay free of scattered increments and
compile to vector code).
"""

from __future__ import annotations

import numba
import numpy as np

# RATIO[code] = 2**(-code/16) as float32; encoder and decoder scale by the same numbers.
RATIO = np.exp2(-np.arange(256, dtype=np.float64) / 16.0).astype(np.float32)
RATIO.setflags(write=False)


@numba.njit(cache=True, nogil=True, inline="always")
def _log_code(base, value):  # pragma: no cover - compiled
    # Largest code with base * RATIO[code] >= value (0 when value >= base).
    if value <= 0.0:
        return 255
    code = int(np.floor(16.0 * np.log2(base / value)))
    code = min(max(code, 0), 255)
    while code > 0 and base * RATIO[code] < value:
        code -= 1
    return code


@numba.njit(cache=True, nogil=True)
def channel_ranges(x, lo, hi):  # pragma: no cover - compiled
    """Per-channel min and max over tokens of x ``[H, T, D]`` f32 into lo/hi ``[H*D]``."""
    num_heads, num_tok, dim = x.shape
    lo[:] = np.inf
    hi[:] = -np.inf
    for h in range(num_heads):
        for t in range(num_tok):
            for d in range(dim):
                v = x[h, t, d]
                c = h * dim + d
                lo[c] = min(lo[c], v)
                hi[c] = max(hi[c], v)


@numba.njit(cache=True, nogil=True)
def quantize_keys(x, lo, hi, num_symbols, symct, hist, codes):  # pragma: no cover - compiled
    """x ``[H, T, D]`` f32 with channel minima ``lo`` (already float16-exact, <= data).

    Fills symct ``[H*D, T]``, hist ``[H*D, A]``, codes ``[H*D]``; returns the base.
    """
    num_heads, num_tok, dim = x.shape
    base = np.float32(0.0)
    for c in range(num_heads * dim):
        base = max(base, hi[c] - lo[c])
    top = num_symbols - 1
    inv = np.empty(num_heads * dim, dtype=np.float32)
    for c in range(num_heads * dim):
        code = _log_code(base, hi[c] - lo[c])
        codes[c] = code
        step = base * RATIO[code] / np.float32(top)
        inv[c] = np.float32(1.0) / step if step > 0 else np.float32(0.0)
    # Token-major walk: contiguous reads; the histogram is a second pass (_histogram).
    for h in range(num_heads):
        for t in range(num_tok):
            for d in range(dim):
                c = h * dim + d
                # x - lo >= 0: truncating v + 0.5 rounds (half up) and, unlike
                # np.rint, compiles to plain vector instructions.
                q = np.int32((x[h, t, d] - lo[c]) * inv[c] + np.float32(0.5))
                symct[c, t] = min(max(q, np.int32(0)), np.int32(top))
    _histogram(symct, hist)
    return base


@numba.njit(cache=True, nogil=True)
def weighted_key_ranges(lo, hi, weights, num_symbols, max_symbols, out):  # pragma: no cover
    """Steps proportional to 1 / weights with the geometric mean of the unweighted
    ones (range / (num_symbols - 1)); writes each channel's maximum (lo + its range)
    into out and returns the alphabet covering the widest channel (<= max_symbols;
    channels needing more keep their own range, unclipped)."""
    num_ch = lo.shape[0]
    log_ratio = 0.0  # mean of log(span) - log(1 / weight)
    for c in range(num_ch):
        log_ratio += np.log(max(np.float64(hi[c]) - lo[c], 1e-30)) + np.log(weights[c])
    unit = np.exp(log_ratio / num_ch) / (num_symbols - 1)
    need = 0.0
    for c in range(num_ch):
        need = max(need, (max(np.float64(hi[c]) - lo[c], 1e-30)) * weights[c] / unit)
    symbols = min(max_symbols, max(2, int(np.ceil(need)) + 1))
    for c in range(num_ch):
        span = max(np.float64(hi[c]) - lo[c], unit / weights[c] * (symbols - 1))
        out[c] = np.float32(lo[c] + span)
    return symbols


@numba.njit(cache=True, nogil=True)
def dequantize_keys(symct, mins, codes, base, num_symbols, out):  # pragma: no cover
    """symct ``[H*D, T]`` -> out ``[H, T, D]`` f32; ``mins`` as float32. Returns max |out|."""
    num_heads, num_tok, dim = out.shape
    top = np.float32(num_symbols - 1)
    step = np.empty(num_heads * dim, dtype=np.float32)
    for c in range(num_heads * dim):
        step[c] = base * RATIO[codes[c]] / top
    peak = np.float32(0.0)
    for h in range(num_heads):
        for t in range(num_tok):
            for d in range(dim):
                c = h * dim + d
                v = mins[c] + np.float32(symct[c, t]) * step[c]
                out[h, t, d] = v
                peak = max(peak, abs(v))
    return peak


@numba.njit(cache=True, nogil=True)
def fwht_rows(y):  # pragma: no cover - compiled
    """Normalised Walsh-Hadamard transform along axis 0 of ``y`` ``[D, N]`` (D a power of 2).

    Transform index first: every butterfly is a contiguous length-N vector operation,
    which numba vectorises; one 64-vector at a time ran at ~5 ns/element.
    """
    dim, n = y.shape
    h = 1
    while h < dim:
        for i in range(0, dim, 2 * h):
            for j in range(i, i + h):
                for k in range(n):
                    a = y[j, k]
                    b = y[j + h, k]
                    y[j, k] = a + b
                    y[j + h, k] = a - b
        h *= 2
    scale = np.float32(1.0 / np.sqrt(dim))
    for j in range(dim):
        for k in range(n):
            y[j, k] *= scale


@numba.njit(cache=True, nogil=True)
def quantize_values(x, num_symbols, rotate, symct, hist, codes):  # pragma: no cover
    """x ``[H, T, D]`` f32 -> symct ``[H*D, T]``, hist, codes ``[H*T]`` u8; returns base.

    Works on the transposed ``[D, H*T]`` block: rotation, per-token max and
    quantisation are contiguous loops, and rows map to symct rows.
    """
    num_heads, num_tok, dim = x.shape
    y = np.empty((dim, num_heads * num_tok), dtype=np.float32)
    for h in range(num_heads):
        for t in range(num_tok):
            for d in range(dim):
                y[d, h * num_tok + t] = x[h, t, d]
    if rotate:
        fwht_rows(y)
    n = num_heads * num_tok
    amax = np.zeros(n, dtype=np.float32)
    for d in range(dim):
        for k in range(n):
            amax[k] = max(amax[k], abs(y[d, k]))
    base = np.float32(0.0)
    for k in range(n):
        base = max(base, amax[k])
    half = (num_symbols - 1) // 2
    inv = np.empty(n, dtype=np.float32)
    for k in range(n):
        code = _log_code(base, amax[k])
        codes[k] = code
        step = np.float32(2.0) * base * RATIO[code] / np.float32(num_symbols - 1)
        inv[k] = np.float32(1.0) / step if step > 0 else np.float32(0.0)
    offset = np.float32(half) + np.float32(0.5)  # keeps the truncated argument >= 0
    top = np.int32(num_symbols - 1)
    for h in range(num_heads):
        for d in range(dim):
            row = symct[h * dim + d]
            src = y[d, h * num_tok : (h + 1) * num_tok]
            scale = inv[h * num_tok : (h + 1) * num_tok]
            for t in range(num_tok):  # vectorised: no histogram update in this loop
                q = np.int32(src[t] * scale[t] + offset)
                row[t] = min(max(q, np.int32(0)), top)
    _histogram(symct, hist)
    return base


@numba.njit(cache=True, nogil=True)
def _histogram(symct, hist):  # pragma: no cover - compiled
    """Per-row symbol counts; four partial counters per row hide the store-to-load
    latency of runs of equal symbols (peaked distributions have long ones)."""
    num_ch, num_tok = symct.shape
    num_symbols = hist.shape[1]
    part = np.empty((4, num_symbols), dtype=np.int64)
    for c in range(num_ch):
        part[:, :] = 0
        row = symct[c]
        whole = num_tok - num_tok % 4
        for t in range(0, whole, 4):
            part[0, row[t]] += 1
            part[1, row[t + 1]] += 1
            part[2, row[t + 2]] += 1
            part[3, row[t + 3]] += 1
        for t in range(whole, num_tok):
            part[0, row[t]] += 1
        for k in range(num_symbols):
            hist[c, k] = part[0, k] + part[1, k] + part[2, k] + part[3, k]


@numba.njit(cache=True, nogil=True)
def dequantize_values(symct, codes, base, num_symbols, rotate, out):  # pragma: no cover
    """symct ``[H*D, T]`` -> out ``[H, T, D]`` f32 (inverse rotation applied); max |out|."""
    num_heads, num_tok, dim = out.shape
    half = np.float32((num_symbols - 1) // 2)
    n = num_heads * num_tok
    step = np.empty(n, dtype=np.float32)
    for k in range(n):
        step[k] = np.float32(2.0) * base * RATIO[codes[k]] / np.float32(num_symbols - 1)
    y = np.empty((dim, n), dtype=np.float32)
    for h in range(num_heads):
        for d in range(dim):
            c = h * dim + d
            for t in range(num_tok):
                y[d, h * num_tok + t] = (np.float32(symct[c, t]) - half) * step[h * num_tok + t]
    if rotate:
        fwht_rows(y)
    peak = np.float32(0.0)
    for h in range(num_heads):
        for t in range(num_tok):
            for d in range(dim):
                v = y[d, h * num_tok + t]
                out[h, t, d] = v
                peak = max(peak, abs(v))
    return peak
