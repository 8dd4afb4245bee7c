"""numpy/torch conversion for the client; torch is imported only when one is involved.

On the wire and inside the client, KV lives in numpy arrays of the layout's
storage dtype: float16, float32, and bfloat16 as its uint16 bit pattern (numpy
has no bfloat16).
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from kvstore.codec.raw import NUMPY_STORAGE
from kvstore.errors import InvalidArgument
from kvstore.layout import KVLayout

# (kind, itemsize) -> dtype name, so either byte order is recognised.
_NUMPY_DTYPE_NAMES = {("f", 2): "float16", ("f", 4): "float32", ("u", 2): "bfloat16"}


def is_torch_tensor(value: Any) -> bool:
    """True for a torch.Tensor, without importing torch when the caller has not."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def to_storage(kv: Any, layout: KVLayout) -> np.ndarray:
    """A numpy view/copy of ``kv`` in the layout's storage dtype; dtype must already match.

    Accepts torch tensors (any device; copied to the CPU) and numpy arrays. A numpy
    bfloat16 tensor is passed as a uint16 array of its bit patterns.
    """
    if is_torch_tensor(kv):
        return _torch_to_storage(kv, layout)
    if not isinstance(kv, np.ndarray):
        raise InvalidArgument(f"kv must be a torch.Tensor or numpy.ndarray, got "
                              f"{type(kv).__name__}")
    name = _NUMPY_DTYPE_NAMES.get((kv.dtype.kind, kv.dtype.itemsize))
    if name != layout.dtype:
        hint = " (pass bfloat16 to numpy as a uint16 bit-pattern array)" \
            if layout.dtype == "bfloat16" else ""
        raise InvalidArgument(f"kv dtype is {kv.dtype}, layout dtype is {layout.dtype}{hint}")
    return kv.astype(NUMPY_STORAGE[layout.dtype], copy=False)


def _torch_to_storage(kv: Any, layout: KVLayout) -> np.ndarray:
    import torch

    name = str(kv.dtype).removeprefix("torch.")  # "float16", "bfloat16", "float32", ...
    if name != layout.dtype:
        raise InvalidArgument(f"kv dtype is {kv.dtype}, layout dtype is {layout.dtype}")
    kv = kv.detach().to("cpu")
    if name == "bfloat16":
        return kv.view(torch.int16).numpy().view(np.uint16)
    return kv.numpy()


def from_storage(arr: np.ndarray, dtype: str, *, as_numpy: bool) -> Any:
    """Return ``arr`` (storage dtype, writable) as numpy, or as a torch tensor of ``dtype``."""
    if as_numpy:
        return arr
    import torch

    if dtype == "bfloat16":
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(arr)
