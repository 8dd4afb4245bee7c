"""``KVLayout`` dtype names to torch dtypes and back (numpy storage dtypes: ``codec.raw``)."""

from __future__ import annotations

import torch

from kvstore.errors import InvalidArgument

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in TORCH_DTYPES.items()}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a layout dtype name ("float16", "bfloat16", "float32")."""
    try:
        return TORCH_DTYPES[name]
    except KeyError:
        raise InvalidArgument(f"dtype must be one of {list(TORCH_DTYPES)}, got {name!r}") from None
