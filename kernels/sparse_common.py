"""Shared launcher checks of the sparse-decode kernels (shapes, strides, dtypes).

Every launcher in ``kernels/sparse_*.py`` validates its arguments here before it
launches, so a bad call fails with an :class:`InvalidArgument` naming the tensor
instead of reading out of bounds on the device.
"""

from __future__ import annotations

from typing import Any

import torch

from kvstore.errors import InvalidArgument

try:  # Triton is optional on CPU-only installs; the references always work.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only without triton
    triton = None
    tl = None

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


def has_triton() -> bool:
    return triton is not None


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def check_tensor(name: str, t: Any, *, ndim: int, dtypes: tuple[torch.dtype, ...],
                 shape: tuple[int | None, ...] | None = None, contiguous: bool = True) -> None:
    """Raise InvalidArgument unless ``t`` is a tensor of ``ndim`` dims, dtype and shape."""
    if not isinstance(t, torch.Tensor):
        raise InvalidArgument(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim != ndim:
        raise InvalidArgument(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise InvalidArgument(f"{name} must be one of {dtypes}, got {t.dtype}")
    if shape is not None:
        for i, (want, got) in enumerate(zip(shape, t.shape, strict=True)):
            if want is not None and want != got:
                raise InvalidArgument(
                    f"{name} dim {i} must be {want}, got shape {tuple(t.shape)}")
    if contiguous and not t.is_contiguous():
        raise InvalidArgument(f"{name} must be contiguous, got strides {t.stride()}")


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise InvalidArgument(f"tensors must share one device, got {devices}")


def require_triton(*tensors: torch.Tensor) -> None:
    """Triton runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1."""
    if triton is None:
        raise InvalidArgument("triton is not installed; use the *_reference functions")
    from triton import knobs

    for t in tensors:
        if not t.is_cuda and not knobs.runtime.interpret:
            raise InvalidArgument(
                "CPU tensor given to a Triton kernel; set TRITON_INTERPRET=1 or use the reference")
