"""Lane-parallel rANS: round trips, damage detection, and size against constriction."""

from __future__ import annotations

import numpy as np
import pytest

from kvstore.codec import dist, fit, rans


def _symbols(channels: int, tokens: int, bins: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    centers = rng.uniform(0, bins - 1, channels)[:, None]
    sym = np.clip(np.rint(rng.laplace(centers, 1.0, (channels, tokens))), 0, bins - 1)
    sym = sym.astype(np.uint8)
    hist = np.stack([np.bincount(r, minlength=bins) for r in sym]).astype(np.int64)
    mu, ss, cdf = fit.fit_and_expand(hist)
    return sym, cdf


@pytest.mark.parametrize(("channels", "tokens", "bins", "cpl"),
                         [(192, 256, 15, 4), (16, 7, 2, 1), (8, 300, 64, 8), (6, 1, 3, 2),
                          (8, 256, 128, 8)])
def test_round_trip_exact_for_shapes(channels: int, tokens: int, bins: int, cpl: int) -> None:
    sym, cdf = _symbols(channels, tokens, bins)
    lane_words, words = rans.encode_section_lanes(sym, cdf, cpl)
    out = rans.decode_section_lanes(words, lane_words, cdf, cpl, tokens)
    assert out is not None
    np.testing.assert_array_equal(out, sym)


@pytest.mark.parametrize(("channels", "cpl"), [(20, 4), (6, 2), (7, 1)])
def test_round_trip_when_decoder_buckets_hold_many_symbols(channels: int, cpl: int) -> None:
    # One dominant symbol and 127 of frequency 1..3: a 128-slot decoder bucket then
    # holds up to ~100 symbol boundaries (the slow path), and lane counts 5, 3 and 7
    # leave a partial group of four. Symbols are uniform, mostly in the tails.
    rng = np.random.default_rng(3)
    freq = rng.integers(1, 4, (channels, dist.MAX_SYMBOLS))
    mode = rng.integers(0, dist.MAX_SYMBOLS, channels)
    freq[np.arange(channels), mode] += dist.PREC_TOTAL - freq.sum(1)
    cdf = np.zeros((channels, dist.MAX_SYMBOLS + 1), dtype=np.int32)
    cdf[:, 1:] = np.cumsum(freq, 1)
    sym = rng.integers(0, dist.MAX_SYMBOLS, (channels, 50)).astype(np.uint8)
    sym[:, ::5] = mode[:, None]
    lane_words, words = rans.encode_section_lanes(sym, cdf, cpl)
    out = rans.decode_section_lanes(words, lane_words, cdf, cpl, 50)
    assert out is not None
    np.testing.assert_array_equal(out, sym)


def test_encoder_float_division_is_exact_for_every_frequency() -> None:
    # The encoder computes x // f as floor((x + 0.5) * (1/f)); check it at the edges
    # of every quotient step it can meet (x < f << 18 before the division).
    f = np.arange(1, dist.PREC_TOTAL + 1, dtype=np.int64)[:, None]
    k = np.concatenate([np.arange(1, 9), (1 << 18) - np.arange(8)])[None, :]
    x = np.concatenate([k * f - 1, k * f, k * f + f - 1], axis=1)
    x = np.where(x < f << 18, x, (f << 18) - 1)
    q = np.floor((x.astype(np.float64) + 0.5) * rans._INV_FREQ[f]).astype(np.int64)
    np.testing.assert_array_equal(q, x // f)


def test_decode_reports_damage_when_a_word_changes() -> None:
    sym, cdf = _symbols(32, 64, 9)
    lane_words, words = rans.encode_section_lanes(sym, cdf, 4)
    damaged = 0
    for i in range(0, len(words), 7):
        bad = words.copy()
        bad[i] ^= 0x0101
        out = rans.decode_section_lanes(bad, lane_words, cdf, 4, 64)
        damaged += out is None or not np.array_equal(out, sym)
        assert out is None or out.shape == sym.shape
    assert damaged == len(range(0, len(words), 7))


def test_decode_reports_damage_when_lane_lengths_are_wrong() -> None:
    sym, cdf = _symbols(32, 64, 9)
    lane_words, words = rans.encode_section_lanes(sym, cdf, 4)
    shifted = lane_words.copy()
    shifted[0] -= 1
    shifted[1] += 1
    assert rans.decode_section_lanes(words, shifted, cdf, 4, 64) is None


def test_size_within_one_percent_of_constriction_with_same_model() -> None:
    constriction = pytest.importorskip("constriction")
    sym, cdf = _symbols(64, 256, 15)
    lane_words, words = rans.encode_section_lanes(sym, cdf, 4)
    ours_bits = 16 * len(words)
    coder = constriction.stream.stack.AnsCoder()
    probs = np.diff(cdf[:, :16], axis=1).astype(np.float64) / dist.PREC_TOTAL
    for c in range(sym.shape[0] - 1, -1, -1):  # ANS is a stack: encode in reverse
        model = constriction.stream.model.Categorical(probs[c], perfect=False)
        coder.encode_reverse(sym[c].astype(np.int32), model)
    ref_bits = 32 * len(coder.get_compressed())
    ideal = -np.log2(np.take_along_axis(probs, sym.astype(np.int64), 1)).sum()
    # Our 16 lanes each flush a 32-bit state; constriction has one stream.
    assert ours_bits <= ref_bits * 1.01 + 16 * 32
    assert ours_bits <= ideal * 1.01 + 16 * 48
