"""HF transformers caches to and from kvstore's ``[layers, 2, heads, tokens, dim]`` tensors."""

from __future__ import annotations

from typing import Any

import torch


def cache_from_kv(model: Any, kv: torch.Tensor) -> Any:
    """A DynamicCache holding ``kv`` ([layers, 2, heads, tokens, dim]) in the model's dtype."""
    from transformers import DynamicCache

    param = next(model.parameters())
    kv = kv.to(device=param.device, dtype=param.dtype)
    cache = DynamicCache(config=model.config)
    for i, layer in enumerate(cache.layers):
        keys, values = kv[i, 0][None], kv[i, 1][None]  # [1, heads, tokens, dim] views
        # Set the tensors directly: DynamicLayer.update would concatenate (copy) them.
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
    return cache


def kv_from_cache(cache: Any, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
    """Tokens ``[start, stop)`` of a DynamicCache as ``[layers, 2, heads, n, dim]`` in ``dtype``."""
    per_layer = [
        torch.stack((layer.keys[0, :, start:stop], layer.values[0, :, start:stop]))
        for layer in cache.layers
    ]
    return torch.stack(per_layer).to(device="cpu", dtype=dtype)
