"""Compiled (numba) CPU twins of dist.py: CDF expansion and distribution fitting.

``expand_cdf`` here computes exactly the integers of ``dist.expand_cdf`` (a test
compares them); numpy's vectorised version costs ~0.25 ms per section and the
candidate search of fitting ~8 ms, against a budget of ~0.4 ms for the whole
section at 250 MB/s.

Sizes come from the arrays (``weights.shape``, ``row.shape``), not from imported
module constants: numba's on-disk cache freezes globals at compile time and does
not notice when another module's constant changes.
"""

from __future__ import annotations

import numba
import numpy as np

from kvstore.codec.dist import MAX_SYMBOLS, PREC_TOTAL, WEIGHTS

_LOG2_FREQ = np.log2(np.maximum(np.arange(PREC_TOTAL + 1, dtype=np.float64), 1.0))
_SCORE_DELTAS = (-1, 0, 1)


@numba.njit(cache=True, nogil=True, inline="always")
def _mu4(mu, num_symbols):  # pragma: no cover - compiled
    return (np.int64(mu) * (4 * (num_symbols - 1)) + 127) // 255


@numba.njit(cache=True, nogil=True, inline="always")
def _freqs(weights, mu4, shape_scale, num_symbols, freq):  # pragma: no cover - compiled
    """Frequencies of one channel into freq[:A] (the integers of dist.expand_cdf)."""
    shape = np.int64(shape_scale) >> 7
    code = np.int64(shape_scale) & 127
    total = np.int64(0)
    top = 0
    wtop = np.int64(-1)
    for k in range(num_symbols):
        w = np.int64(weights[shape, code, min(abs(4 * k - mu4), weights.shape[2] - 1)])
        freq[k] = w
        total += w
        if w > wtop:
            wtop = w
            top = k
    acc = np.int64(0)
    for k in range(num_symbols):
        freq[k] = 1 + (freq[k] * (PREC_TOTAL - num_symbols)) // total
        acc += freq[k]
    freq[top] += PREC_TOTAL - acc


@numba.njit(cache=True, nogil=True)
def expand_row(weights, mu, shape_scale, num_symbols, row, freq):  # pragma: no cover
    """One channel's CDF into ``row`` [MAX_SYMBOLS + 1] (same integers as dist.expand_cdf)."""
    _freqs(weights, _mu4(mu, num_symbols), shape_scale, num_symbols, freq)
    row[0] = 0
    acc = 0
    for k in range(num_symbols):
        acc += freq[k]
        row[k + 1] = acc
    for k in range(num_symbols + 1, row.shape[0]):
        row[k] = PREC_TOTAL


@numba.njit(cache=True, nogil=True)
def expand_cdfs(weights, mu, shape_scale, num_symbols, cdf):  # pragma: no cover
    freq = np.empty(cdf.shape[1] - 1, dtype=np.int64)
    for c in range(mu.shape[0]):
        expand_row(weights, mu[c], shape_scale[c], num_symbols, cdf[c], freq)


@numba.njit(cache=True, nogil=True)
def fit_channels(hist, weights, log2_freq, mu_out, ss_out, cdf):  # pragma: no cover
    """Per channel: location from the mean, then the cheapest of 3 scale codes per shape."""
    num_ch, num_symbols = hist.shape
    freq = np.empty(cdf.shape[1] - 1, dtype=np.int64)
    span = max(num_symbols - 1, 1)
    for c in range(num_ch):
        n = 0.0
        m1 = 0.0
        for k in range(num_symbols):
            n += hist[c, k]
            m1 += hist[c, k] * k
        n = max(n, 1.0)
        mu = min(max(int(np.rint(m1 / n * 255.0 / span)), 0), 255)
        mu4 = _mu4(mu, num_symbols)
        mad = 0.0
        var = 0.0
        for k in range(num_symbols):
            dist = abs(4 * k - mu4) / 4.0
            mad += hist[c, k] * dist
            var += hist[c, k] * dist * dist
        ests = (max(mad / n, 1e-3), max(np.sqrt(var / n), 1e-3))
        best_cost = np.inf
        best = 0
        for shape in range(2):
            center = int(np.rint(8.0 * (np.log2(ests[shape]) + 4.0)))
            for delta in (-1, 0, 1):
                code = min(max(center + delta, 0), 127)
                ss = (shape << 7) | code
                _freqs(weights, mu4, ss, num_symbols, freq)
                cost = 0.0
                for k in range(num_symbols):
                    if hist[c, k]:
                        cost -= hist[c, k] * log2_freq[freq[k]]
                if cost < best_cost:
                    best_cost = cost
                    best = ss
        mu_out[c] = mu
        ss_out[c] = best
        expand_row(weights, mu, best, num_symbols, cdf[c], freq)


def fit_and_expand(hist: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mu, shape_scale, cdf) for histograms ``[channels, A]``."""
    num_ch = hist.shape[0]
    mu = np.empty(num_ch, dtype=np.uint8)
    ss = np.empty(num_ch, dtype=np.uint8)
    cdf = np.empty((num_ch, MAX_SYMBOLS + 1), dtype=np.int32)
    fit_channels(hist, WEIGHTS, _LOG2_FREQ, mu, ss, cdf)
    return mu, ss, cdf


def expand(mu: np.ndarray, shape_scale: np.ndarray, num_symbols: int) -> np.ndarray:
    cdf = np.empty((mu.shape[0], MAX_SYMBOLS + 1), dtype=np.int32)
    expand_cdfs(WEIGHTS, mu, shape_scale, num_symbols, cdf)
    return cdf
