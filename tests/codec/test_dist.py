"""Parametric distributions: the integer CDFs are identical in numpy, torch and numba."""

from __future__ import annotations

import numpy as np
import torch
import xxhash

from kvstore.codec import dist, fit


def test_weight_table_matches_pinned_digest() -> None:
    # Objects decode anywhere only if every platform builds the same table.
    assert xxhash.xxh64(dist.WEIGHTS.tobytes()).hexdigest() == dist.WEIGHTS_DIGEST


def test_cdf_expansion_identical_in_numpy_torch_numba_for_random_params() -> None:
    rng = np.random.default_rng(0)
    mu = rng.integers(0, 256, 3000).astype(np.uint8)
    ss = rng.integers(0, 256, 3000).astype(np.uint8)
    bins = rng.integers(2, dist.MAX_SYMBOLS + 1, 3000)
    a = dist.expand_cdf(np, dist.WEIGHTS, mu, ss, bins)
    b = dist.expand_cdf(torch, torch.from_numpy(dist.WEIGHTS.copy()), torch.from_numpy(mu),
                        torch.from_numpy(ss), torch.from_numpy(bins)).numpy()
    c = np.stack([fit.expand(mu[i : i + 1], ss[i : i + 1], int(bins[i]))[0]
                  for i in range(len(mu))])
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)


def test_cdf_rows_are_valid_for_every_param() -> None:
    mu = np.repeat(np.arange(256, dtype=np.uint8), 256)
    ss = np.tile(np.arange(256, dtype=np.uint8), 256)
    for bins in (2, 7, 64, 128):
        cdf = dist.expand_cdf(np, dist.WEIGHTS, mu, ss, bins)
        freq = np.diff(cdf, axis=1)
        assert (cdf[:, 0] == 0).all() and (cdf[:, -1] == dist.PREC_TOTAL).all()
        assert (freq[:, :bins] >= 1).all() and (freq[:, bins:] == 0).all()


def test_fit_prefers_cheaper_params_than_a_flat_distribution() -> None:
    rng = np.random.default_rng(1)
    sym = np.clip(np.rint(rng.laplace(7, 1.5, (64, 256))), 0, 14).astype(np.int64)
    hist = np.stack([np.bincount(r, minlength=15) for r in sym])
    mu, ss, cdf = fit.fit_and_expand(hist)
    freq = np.diff(cdf[:, :16], axis=1)
    coded = -(hist * np.log2(freq / dist.PREC_TOTAL)).sum()
    empirical = -(hist * np.log2(np.maximum(hist, 1) / 256)).sum()
    assert coded < 1.05 * empirical + 64 * 4 and coded < hist.sum() * np.log2(15)


def test_fit_candidate_pricing_matches_the_expanded_cdf_for_every_param() -> None:
    # fit._gains3 prices three scale codes from tables (weight totals, most likely
    # symbol) without expanding their CDFs; each must give exactly the bits of the
    # CDF it stands for.
    rng = np.random.default_rng(2)

    def gains(mu, shape, center, hist, first, bins):
        return [fit._gains3(dist.WEIGHTS, fit._PREFIX, fit._PLATEAU,
                            int(dist.mu4_of(int(m), bins)), int(sh), int(c), h, first, bins,
                            fit._LOG2_FIXED)
                for m, sh, c, h in zip(mu, shape, center, hist, strict=True)]

    for bins in (2, 3, 8, 15, 47, 95, 128):
        mu = np.repeat(np.arange(0, 256, 5, dtype=np.uint8), 256 // 4 + 1)
        ss = np.tile(np.arange(0, 256, 4, dtype=np.uint8), len(mu) // 64 + 1)[: len(mu)]
        shape, center = ss >> 7, np.clip(ss.astype(np.int64) & 127, 1, 126)
        hist = rng.integers(0, 300, (len(mu), bins)) * (rng.random((len(mu), bins)) < 0.6)
        partial = hist.copy()
        partial[:, : bins // 3] = 0
        exact, near = gains(mu, shape, center, hist, 0, bins), gains(
            mu, shape, center, partial, bins // 3, bins)
        for i, delta in enumerate((-1, 0, 1)):
            codes = (shape.astype(np.int64) << 7) | (center + delta)
            cdf = dist.expand_cdf(np, dist.WEIGHTS, mu, codes, bins)
            freq = np.diff(cdf, axis=1)[:, :bins]
            want = (hist * fit._LOG2_FIXED[freq]).sum(1)
            np.testing.assert_array_equal(np.array([g[i] for g in exact]), want)
            # Over the occurring symbols only, the leftover is estimated: near, not exact.
            want = (partial * fit._LOG2_FIXED[freq]).sum(1)
            err = np.abs(np.array([g[i] for g in near]) - want) / 2.0**32  # bits
            assert np.all(err <= 0.002 * want / 2.0**32 + 1)
