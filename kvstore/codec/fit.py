"""Compiled (numba) CPU twins of dist.py: CDF expansion and distribution fitting.

``expand_cdf`` here computes exactly the integers of ``dist.expand_cdf`` (a test
compares them); numpy's vectorised version costs ~0.25 ms per section and the
candidate search of fitting ~8 ms, against a budget of ~0.4 ms for the whole
section at 250 MB/s. Fitting picks the shape from the histogram's moments and prices
three scale codes in one pass over the occurring symbols (``_gains3``: weight totals
from prefix sums, integer bit counts, divisions as exact float multiplies).

Sizes come from the arrays (``weights.shape``, ``row.shape``), not from imported
module constants: numba's on-disk cache freezes globals at compile time and does
not notice when another module's constant changes.
"""

from __future__ import annotations

import numba
import numpy as np

from kvstore.codec.dist import MAX_SYMBOLS, PREC_TOTAL, WEIGHTS

# log2(f) in units of 2**-32 bits: integer sums are exact in any order (a float sum's
# rounding depends on it) and cannot overflow (65000 tokens * 14 bits * 2**32 < 2**63).
_LOG2_FIXED = np.rint(np.log2(np.maximum(np.arange(PREC_TOTAL + 1, dtype=np.float64), 1.0))
                      * 2.0**32).astype(np.int64)
# mad/std below this picks the Laplace shape (0.707 for a Laplace, 0.798 for a
# Gaussian); 0.775 gave the fewest bits on SmolLM2 KV (sweep in docs/design.md §3).
_LAPLACE_BELOW = 0.775
# Channels occupying at most this many symbols price both shapes (6 codes): they
# cost little to price, and small alphabets (the compact levels) are where the
# shape guess misses most (aggressive+cal: +4% bits when guessing everywhere).
_PRICE_BOTH_UP_TO = 12


@numba.njit(cache=True, nogil=True, inline="always")
def _mu4(mu, num_symbols):  # pragma: no cover - compiled
    return (np.int64(mu) * (4 * (num_symbols - 1)) + 127) // 255


@numba.njit(cache=True, nogil=True, inline="always")
def _row_total_top(weights, prefix, plateau, mu4, shape_scale, num_symbols):  # pragma: no cover
    """(weight row, weight total over the alphabet, first most likely symbol, its
    distance) of one channel's distribution, from the prefix/plateau tables."""
    shape = np.int64(shape_scale) >> 7
    code = np.int64(shape_scale) & 127
    wrow = weights[shape, code]
    # Distances in quarter symbols: rl + 4j on the left of mu4 (k = k0 - j), 4 - rl +
    # 4j on the right; mu4 lies in [0, 4 (A - 1)], so they stay below 4 * MAX_SYMBOLS.
    k0 = mu4 >> 2
    rl = mu4 & 3
    right = num_symbols - 1 - k0
    total = prefix[shape, code, rl, k0 + 1]
    if rl:
        total += prefix[shape, code, 4 - rl, right]
    else:
        total += prefix[shape, code, 0, right + 1] - prefix[shape, code, 0, 1]
    # The first most likely symbol: weights fall with distance, so the symbols of
    # the largest weight are those within the plateau of the nearest one.
    dmin = min(rl, 4 - rl)
    reach = plateau[shape, code, dmin]
    top = max(0, (mu4 - reach + 3) >> 2) if rl <= reach else k0 + 1
    return wrow, total, top, dmin


@numba.njit(cache=True, nogil=True, inline="always")
def _finish_gain(wrow, total, top, dmin, acc, wsum, gain, inv, others, hist, spread,
                 log2_fixed):  # pragma: no cover - compiled
    """Add the leftover's re-pricing of the most likely symbol to one candidate's gain."""
    acc += others + np.int64(np.float64((total - wsum) * spread) * inv - 0.5 * others + 0.5)
    ftop = 1 + np.int64((np.float64(np.int64(wrow[dmin]) * spread) + 0.5) * inv)
    leftover = min(max(PREC_TOTAL - acc, 0), PREC_TOTAL - ftop)
    return gain + hist[top] * (log2_fixed[ftop + leftover] - log2_fixed[ftop])


@numba.njit(cache=True, nogil=True, inline="always")
def _gains3(weights, prefix, plateau, mu4, shape, center, hist, first, end,
            log2_fixed):  # pragma: no cover - compiled
    """sum(hist * log2(freq)) in 2**-32 bits for scale codes center-1, center, center+1.

    One pass over the symbols that occur, ``[first, end)``, pricing the three
    candidates side by side (one pass each cost ~40% more): the weight totals come
    from prefix sums, the symbol taking the leftover from the weight plateau, and the
    sums are in fixed point. The leftover (2**14 minus the rounded-down frequencies)
    is exact over the occurring symbols and estimated over the others (each rounds
    down by half a unit on average): it only re-prices the most likely symbol's
    term, and the price only ranks candidates, so the decoder is unaffected.
    Weighted key sections (section.py) use large alphabets of which a channel
    occupies a few symbols; this keeps fitting proportional to what occurs.
    """
    num_symbols = hist.shape[0]
    spread = PREC_TOTAL - num_symbols
    base = shape << 7
    w0, t0, top0, dmin = _row_total_top(weights, prefix, plateau, mu4, base | (center - 1),
                                        num_symbols)
    w1, t1, top1, _ = _row_total_top(weights, prefix, plateau, mu4, base | center,
                                     num_symbols)
    w2, t2, top2, _ = _row_total_top(weights, prefix, plateau, mu4, base | (center + 1),
                                     num_symbols)
    i0, i1, i2 = 1.0 / np.float64(t0), 1.0 / np.float64(t1), 1.0 / np.float64(t2)
    a0 = a1 = a2 = s0 = s1 = s2 = g0 = g1 = g2 = np.int64(0)
    for k in range(first, end):
        d = abs(4 * k - mu4)
        h = hist[k]
        x0, x1, x2 = np.int64(w0[d]), np.int64(w1[d]), np.int64(w2[d])
        f0 = 1 + np.int64((np.float64(x0 * spread) + 0.5) * i0)
        f1 = 1 + np.int64((np.float64(x1 * spread) + 0.5) * i1)
        f2 = 1 + np.int64((np.float64(x2 * spread) + 0.5) * i2)
        a0 += f0
        a1 += f1
        a2 += f2
        s0 += x0
        s1 += x1
        s2 += x2
        g0 += h * log2_fixed[f0]
        g1 += h * log2_fixed[f1]
        g2 += h * log2_fixed[f2]
    others = num_symbols - (end - first)
    return (_finish_gain(w0, t0, top0, dmin, a0, s0, g0, i0, others, hist, spread, log2_fixed),
            _finish_gain(w1, t1, top1, dmin, a1, s1, g1, i1, others, hist, spread, log2_fixed),
            _finish_gain(w2, t2, top2, dmin, a2, s2, g2, i2, others, hist, spread, log2_fixed))


def _weight_tables() -> tuple[np.ndarray, np.ndarray]:
    """For _gain: prefix[shape, code, r, m] = sum of WEIGHTS[shape, code, r + 4j] for
    j < m; plateau[shape, code, d] = the largest distance whose weight is still
    WEIGHTS[shape, code, d] (weights never grow with distance)."""
    w = WEIGHTS.astype(np.int64)
    shapes, codes, _ = w.shape
    prefix = np.zeros((shapes, codes, 4, MAX_SYMBOLS + 1), dtype=np.int64)
    for r in range(4):
        prefix[:, :, r, 1:] = np.cumsum(w[:, :, r : 4 * MAX_SYMBOLS : 4], axis=2)
    plateau = np.stack([(w >= w[:, :, d : d + 1]).sum(2) - 1 for d in range(3)], axis=2)
    return prefix, plateau


_PREFIX, _PLATEAU = _weight_tables()
assert (np.diff(WEIGHTS, axis=2) <= 0).all(), "weights must not grow with distance"


@numba.njit(cache=True, nogil=True)
def expand_row(weights, prefix, plateau, mu, shape_scale, num_symbols, row):  # pragma: no cover
    """One channel's CDF into ``row`` [MAX_SYMBOLS + 1] (same integers as dist.expand_cdf).

    One pass over the alphabet: the weight total and the most likely symbol come from
    the tables, as in _gain (the large alphabets of weighted key sections made the
    passes count).
    """
    mu4 = _mu4(mu, num_symbols)
    wrow, total, top, _ = _row_total_top(weights, prefix, plateau, mu4, shape_scale,
                                         num_symbols)
    # freq = 1 + w * (2**14 - A) // total, the division as a float64 multiply (64-bit
    # division costs ~6x more here): the quotient is < 2**14, (n + 0.5) / total is at
    # least 2**-24 away from an integer and the float64 error below 2**-37, so
    # truncating (n + 0.5) * (1 / total) gives the exact floor.
    inv = 1.0 / np.float64(total)
    spread = PREC_TOTAL - num_symbols
    row[0] = 0
    acc = np.int64(0)
    for k in range(num_symbols):
        acc += 1 + np.int64((np.float64(np.int64(wrow[abs(4 * k - mu4)]) * spread) + 0.5) * inv)
        row[k + 1] = acc
    leftover = PREC_TOTAL - acc  # goes to the most likely symbol
    for k in range(top + 1, num_symbols + 1):
        row[k] += leftover
    for k in range(num_symbols + 1, row.shape[0]):
        row[k] = PREC_TOTAL


@numba.njit(cache=True, nogil=True)
def expand_cdfs(weights, prefix, plateau, mu, shape_scale, num_symbols, cdf):  # pragma: no cover
    for c in range(mu.shape[0]):
        expand_row(weights, prefix, plateau, mu[c], shape_scale[c], num_symbols, cdf[c])


@numba.njit(cache=True, nogil=True)
def fit_channels(hist, weights, prefix, plateau, log2_fixed, mu_out, ss_out,
                 cdf):  # pragma: no cover - compiled
    """Per channel: location from the mean, shape from the peakedness, then the cheapest
    of 3 scale codes."""
    num_ch, num_symbols = hist.shape
    span = max(num_symbols - 1, 1)
    for c in range(num_ch):
        # Moments as integer sums: no int-to-float conversion per term, and every
        # partial sum is an integer below 2**53, so they equal the float sums exactly.
        first = 0
        while first < num_symbols - 1 and hist[c, first] == 0:
            first += 1
        end = num_symbols
        while end > first + 1 and hist[c, end - 1] == 0:
            end -= 1
        count = np.int64(0)
        m1 = np.int64(0)
        for k in range(first, end):
            count += hist[c, k]
            m1 += hist[c, k] * k
        n = max(np.float64(count), 1.0)
        mu = min(max(int(np.rint(np.float64(m1) / n * 255.0 / span)), 0), 255)
        mu4 = _mu4(mu, num_symbols)
        mad4 = np.int64(0)  # sum of hist * distance, in quarter symbols
        var16 = np.int64(0)
        for k in range(first, end):
            d4 = abs(4 * k - mu4)
            mad4 += hist[c, k] * d4
            var16 += hist[c, k] * d4 * d4
        mad = max(np.float64(mad4) / 4.0 / n, 1e-3)
        std = max(np.sqrt(np.float64(var16) / 16.0 / n), 1e-3)
        # The shape from the histogram's peakedness (mean absolute deviation over
        # standard deviation: 0.71 for a Laplace, 0.80 for a Gaussian), then the
        # cheapest of 3 scale codes around that shape's estimate. Pricing both shapes
        # chose the same code for most channels and cost 0.03% of the bits less on
        # SmolLM2 KV, at twice the fitting time (docs/design.md §3).
        guess = 0 if mad < _LAPLACE_BELOW * std else 1
        best_gain = np.int64(-1)
        best = 0
        for shape in range(2):
            if shape != guess and end - first > _PRICE_BOTH_UP_TO:
                continue
            est = mad if shape == 0 else std
            center = min(max(int(np.rint(8.0 * (np.log2(est) + 4.0))), 1), 126)
            g0, g1, g2 = _gains3(weights, prefix, plateau, mu4, shape, center, hist[c],
                                 first, end, log2_fixed)
            code = center - 1 if g0 >= g1 and g0 >= g2 else (center if g1 >= g2 else center + 1)
            gain = max(g0, g1, g2)
            if gain > best_gain:
                best_gain = gain
                best = (shape << 7) | code
        mu_out[c] = mu
        ss_out[c] = best
        expand_row(weights, prefix, plateau, mu, best, num_symbols, cdf[c])


def fit_and_expand(hist: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mu, shape_scale, cdf) for histograms ``[channels, A]``."""
    num_ch = hist.shape[0]
    mu = np.empty(num_ch, dtype=np.uint8)
    ss = np.empty(num_ch, dtype=np.uint8)
    cdf = np.empty((num_ch, MAX_SYMBOLS + 1), dtype=np.int32)
    fit_channels(hist, WEIGHTS, _PREFIX, _PLATEAU, _LOG2_FIXED, mu, ss, cdf)
    return mu, ss, cdf


def expand(mu: np.ndarray, shape_scale: np.ndarray, num_symbols: int) -> np.ndarray:
    cdf = np.empty((mu.shape[0], MAX_SYMBOLS + 1), dtype=np.int32)
    expand_cdfs(WEIGHTS, _PREFIX, _PLATEAU, mu, shape_scale, num_symbols, cdf)
    return cdf
