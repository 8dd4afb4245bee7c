"""float16/bfloat16 <-> float32 conversion in numba (numba has no float16 type).

numpy's casts from float32 to float16 ran at ~18 ns/element here (a scalar path),
more than the whole entropy decoder; these loops run at memory speed. Halves are
handled as their uint16 bit patterns; rounding is to nearest even, like numpy's
(tests/codec/test_halfconv.py compares them on every float16 and random floats).
"""

from __future__ import annotations

import numba
import numpy as np

F16_TO_F32 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(
    np.float32)
F16_TO_F32.setflags(write=False)


@numba.njit(cache=True, nogil=True)
def f16_bits_to_f32(src, lut, dst):  # pragma: no cover - compiled
    for i in range(src.shape[0]):
        dst[i] = lut[src[i]]


@numba.njit(cache=True, nogil=True)
def bf16_bits_to_f32(src, dst_bits):  # pragma: no cover - compiled
    for i in range(src.shape[0]):
        dst_bits[i] = np.uint32(src[i]) << np.uint32(16)


@numba.njit(cache=True, nogil=True)
def f32_to_f16_bits(src, dst):  # pragma: no cover - compiled
    bits = src.view(np.uint32)
    for i in range(src.shape[0]):
        b = np.int64(bits[i])
        sign = (b >> 16) & 0x8000
        a = b & 0x7FFFFFFF
        if a >= 0x47800000:  # >= 65536, inf or nan
            h = 0x7E00 if a > 0x7F800000 else 0x7C00
        elif a < 0x38800000:  # below 2**-14: subnormal half; v * 2**24 is exact
            h = np.int64(np.rint(np.float64(abs(src[i])) * 16777216.0))
        else:  # rebias 127 -> 15 and round the 13 dropped bits to nearest even
            h = ((a - 0x38000000) + 0xFFF + ((a >> 13) & 1)) >> 13
        dst[i] = h | sign


@numba.njit(cache=True, nogil=True)
def f32_to_bf16_bits(src, dst):  # pragma: no cover - compiled
    bits = src.view(np.uint32)
    for i in range(src.shape[0]):
        b = np.int64(bits[i])
        if (b & 0x7FFFFFFF) > 0x7F800000:
            dst[i] = (b >> 16) | 0x40  # quiet nan
        else:
            dst[i] = (b + 0x7FFF + ((b >> 16) & 1)) >> 16


def to_float32(arr: np.ndarray, dtype: str) -> np.ndarray:
    """Storage array (float16, bf16 as uint16 bits, float32) -> new float32 array."""
    if dtype == "float32":
        return np.ascontiguousarray(arr, dtype=np.float32)
    src = np.ascontiguousarray(arr).reshape(-1).view(np.uint16)
    out = np.empty(src.shape[0], dtype=np.float32)
    if dtype == "float16":
        f16_bits_to_f32(src, F16_TO_F32, out)
    else:
        bf16_bits_to_f32(src, out.view(np.uint32))
    return out.reshape(arr.shape)


def from_float32(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 -> storage array of ``dtype`` (bf16 as uint16 bits)."""
    if dtype == "float32":
        return x
    out = np.empty(x.shape, dtype=np.float16 if dtype == "float16" else np.uint16)
    src, dst = np.ascontiguousarray(x).reshape(-1), out.reshape(-1).view(np.uint16)
    (f32_to_f16_bits if dtype == "float16" else f32_to_bf16_bits)(src, dst)
    return out
