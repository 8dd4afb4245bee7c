"""Parametric symbol distributions of the kvq codec: two bytes per channel, exact integer CDFs.

Each entropy-coded channel carries two bytes: ``mu`` (the location, 0..255 spread
over the alphabet) and ``shape_scale`` (bit 7: 0 Laplace, 1 Gaussian; bits 0-6: a
log2 scale code). A 256-token channel would otherwise need a 16-bit CDF of up to 128
entries (DESIGN §3: as much as the payload); two bytes cost 0.06 bits/element.

The CDF is expanded from the two bytes with integer arithmetic only, over a constant
weight table, so numpy (CPU encoder and decoder) and torch (GPU decoder) produce the
same integers bit for bit. The weight table is built once in float64 and rounded to
integers; ``WEIGHTS_DIGEST`` pins it, and a test fails if a platform ever builds a
different one.

``expand_cdf`` takes an array namespace ``xp`` (numpy or torch), so the same code
runs on both; ``fit.py`` holds its compiled CPU twin and the fitting.
"""

from __future__ import annotations

from typing import Any

import numpy as np

PREC_BITS = 14  # probabilities are integers out of 2**PREC_BITS
PREC_TOTAL = 1 << PREC_BITS
MAX_SYMBOLS = 128  # largest alphabet; CDF rows are padded to this (search depth <= 7)
_DQ = 4 * MAX_SYMBOLS  # distances in quarter-symbol steps
_NUM_SCALE_CODES = 128
_WEIGHT_ONE = 1 << 16  # weight of a symbol at the mode


def scale_of_code(code: np.ndarray | int) -> np.ndarray:
    """Scale (in symbols) of a 7-bit scale code: 2**(code/8 - 4), 1/16 .. 3900."""
    return np.exp2(np.asarray(code, dtype=np.float64) / 8.0 - 4.0)


def _build_weights() -> np.ndarray:
    """[2 shapes, 128 scale codes, 4*MAX_SYMBOLS distances] int32 weights in [1, 2**16]."""
    dist = np.arange(_DQ, dtype=np.float64) / 4.0  # distance in symbols
    scale = scale_of_code(np.arange(_NUM_SCALE_CODES))[:, None]
    laplace = np.exp(-dist[None, :] / scale)
    gauss = np.exp(-0.5 * (dist[None, :] / scale) ** 2)
    w = np.stack([laplace, gauss]) * _WEIGHT_ONE
    return np.maximum(np.floor(w + 0.5), 1).astype(np.int32)


WEIGHTS = _build_weights()
WEIGHTS.setflags(write=False)
# xxh64 of WEIGHTS.tobytes(): objects written anywhere decode anywhere only if every
# platform builds the same table; tests/codec/test_dist.py checks it.
WEIGHTS_DIGEST = "1a42c5dc9d78d5cf"


def mu4_of(mu: Any, num_symbols: Any) -> Any:
    """Location in quarter symbols from the ``mu`` byte: round(mu * 4 * (A - 1) / 255)."""
    return (mu * (4 * (num_symbols - 1)) + 127) // 255


def expand_cdf(xp: Any, weights: Any, mu: Any, shape_scale: Any, num_symbols: Any) -> Any:
    """Integer CDFs, ``[channels, MAX_SYMBOLS + 1]`` int32, padded with PREC_TOTAL.

    Args:
        xp: numpy or torch.
        weights: WEIGHTS as an ``xp`` array (int32 or int64), on the arrays' device.
        mu: ``[channels]`` location bytes (any integer dtype).
        shape_scale: ``[channels]`` shape/scale bytes.
        num_symbols: alphabet size A (2..MAX_SYMBOLS), an int or a ``[channels]`` array.

    Every symbol below A gets frequency >= 1, the frequencies sum to PREC_TOTAL,
    and the leftover of the integer division goes to the first most likely symbol.
    """
    is_np = xp is np
    kw = {} if is_np else {"device": mu.device}

    def i64(a: Any) -> Any:
        return a.astype(np.int64) if is_np else a.to(xp.int64)

    mu, ss = i64(mu), i64(shape_scale)
    n = mu.shape[0]
    if isinstance(num_symbols, int):
        num_symbols = xp.full((n,), num_symbols, dtype=xp.int64, **kw)
    a = i64(num_symbols)[:, None]  # [channels, 1]
    ks = xp.arange(MAX_SYMBOLS, dtype=xp.int64, **kw)[None, :]
    valid = ks < a
    dq = xp.abs(4 * ks - mu4_of(mu[:, None], a))
    dq = xp.minimum(dq, xp.full_like(dq, _DQ - 1))
    w = i64(weights[(ss >> 7)[:, None], (ss & 127)[:, None], dq]) * valid
    total = w.sum(1)[:, None]
    freq = (1 + (w * (PREC_TOTAL - a)) // total) * valid
    left = PREC_TOTAL - freq.sum(1)
    rows = xp.arange(n, **kw)
    top = w.argmax(1)
    freq[rows, top] += left
    cdf = xp.zeros((n, MAX_SYMBOLS + 1), dtype=xp.int64, **kw)
    # Frequencies past A are 0, so the padding already reads PREC_TOTAL.
    cdf[:, 1:] = xp.cumsum(freq, 1) if is_np else xp.cumsum(freq, dim=1)
    return cdf.astype(np.int32) if is_np else cdf.to(xp.int32)
