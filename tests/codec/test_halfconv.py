"""numba half-precision conversions agree with numpy/torch bit for bit."""

from __future__ import annotations

import numpy as np
import torch

from kvstore.codec import halfconv


def test_every_float16_round_trips_through_float32() -> None:
    halves = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    finite = ~np.isnan(halves)
    wide = halfconv.to_float32(halves, "float16")
    np.testing.assert_array_equal(wide[finite], halves[finite].astype(np.float32))
    back = halfconv.from_float32(wide, "float16")
    assert np.array_equal(back.view(np.uint16)[finite], halves.view(np.uint16)[finite])
    assert np.isnan(back[~finite]).all()


def test_float32_to_float16_rounds_like_numpy_including_ties() -> None:
    rng = np.random.default_rng(0)
    halves = np.arange(0x7C00, dtype=np.uint16).view(np.float16).astype(np.float32)
    ties = (halves[:-1] + halves[1:]) / 2  # exact midpoints: round half to even
    x = np.concatenate([rng.standard_normal(200_000).astype(np.float32) * scale
                        for scale in (1e-7, 1e-5, 1e-2, 1.0, 3e4)] + [ties, -ties])
    x = np.concatenate([x, np.array([65519.0, 65520.0, 1e9, -np.inf, 0.0, -0.0], np.float32)])
    with np.errstate(over="ignore"):
        expected = x.astype(np.float16).view(np.uint16)
    np.testing.assert_array_equal(halfconv.from_float32(x, "float16").view(np.uint16), expected)


def test_bfloat16_conversions_match_torch() -> None:
    x = np.random.default_rng(1).standard_normal(100_000).astype(np.float32) * 1e3
    expected = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    bits = halfconv.from_float32(x, "bfloat16")
    np.testing.assert_array_equal(bits, expected)
    back = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(halfconv.to_float32(bits, "bfloat16"), back)
