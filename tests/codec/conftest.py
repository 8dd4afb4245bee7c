"""Codec tests: the Triton decode kernel runs interpreted on the CPU without a GPU.

TRITON_INTERPRET must be set before kernels are decorated (at import), so it is set
here, ahead of collecting the modules that import them.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def synthetic_kv(layers: int, heads: int, tokens: int, dim: int, seed: int = 0) -> np.ndarray:
    """KV-like float16 data: keys with per-channel offsets and outlier channels, a sink
    token, values near Gaussian. Quality is measured on the real model elsewhere."""
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((layers, heads, tokens, dim)) * rng.uniform(0.2, 3.0, dim)
    keys += rng.normal(0.0, 2.0, (layers, heads, 1, dim))
    keys[:, :, 0] *= 4.0  # attention-sink-like outlier token
    values = rng.standard_normal((layers, heads, tokens, dim)) * 0.5
    return np.stack([keys, values], axis=1).astype(np.float16)


@pytest.fixture(scope="session")
def small_kv() -> np.ndarray:
    """``[4, 2, 2, 64, 32]`` float16."""
    return synthetic_kv(4, 2, 64, 32)
