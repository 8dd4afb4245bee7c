"""float16/bfloat16 <-> float32 conversion of storage arrays, through torch's CPU kernels.

numpy's casts from float32 to float16 ran at ~18 ns/element here (a scalar path),
more than the whole entropy decoder; a numba table/bit-twiddling loop ran at ~0.4
ns/element; torch's vectorised (F16C/AVX-512) casts run at ~0.15 ns/element, with
the same round-to-nearest-even (tests/codec/test_halfconv.py compares them with
numpy on every float16 and random floats). bfloat16 arrays are stored as their
uint16 bit patterns, which torch views as bfloat16 without a copy.
"""

from __future__ import annotations

import numpy as np
import torch


def to_float32(arr: np.ndarray, dtype: str) -> np.ndarray:
    """Storage array (float16, bf16 as uint16 bits, float32) -> new float32 array."""
    if dtype == "float32":
        return np.ascontiguousarray(arr, dtype=np.float32)
    arr = np.ascontiguousarray(arr)
    # torch warns on read-only arrays (it cannot promise not to write); copy those.
    src = torch.from_numpy(arr if arr.flags.writeable else arr.copy())
    if dtype == "bfloat16":
        src = src.view(torch.int16).view(torch.bfloat16)
    # A numpy-allocated temporary: freed after encoding, its memory is reused.
    out = np.empty(arr.shape, dtype=np.float32)
    torch.from_numpy(out).copy_(src)
    return out


def from_float32(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 -> storage array of ``dtype`` (bf16 as uint16 bits)."""
    if dtype == "float32":
        return x
    x = np.ascontiguousarray(x, dtype=np.float32)
    src = torch.from_numpy(x if x.flags.writeable else x.copy())
    # torch allocates the result: numpy's huge-page advice made first writes to a
    # fresh (kept) output ~5x slower here (the kernel compacts memory to find pages).
    if dtype == "float16":
        return src.to(torch.float16).numpy()
    return src.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
