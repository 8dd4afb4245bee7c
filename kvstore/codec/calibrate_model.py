"""Sensitivity measurement for ``kvstore calibrate`` on the real model (SmolLM2).

Shared with the codec benchmark: exact cache, KL and perplexity with a decoded cache.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from kvstore.codec import section as sec
from kvstore.codec.calibrate import REFERENCE_BINS
from kvstore.codec.kvq import value_kind
from kvstore.layout import KVLayout

log = logging.getLogger(__name__)


def prefill(model: Any, ids: list[int], num_prefix: int) -> np.ndarray:
    """Exact cache of the prefix, float32 ``[layers, 2, heads, tokens, dim]``."""
    import torch

    with torch.no_grad():
        out = model(torch.tensor([ids[:num_prefix]]), use_cache=True)
    cache = out.past_key_values
    return np.stack([np.stack([lay.keys[0].float().numpy(), lay.values[0].float().numpy()])
                     for lay in cache.layers])


def continuation_logprobs(model: Any, kv: np.ndarray, ids: list[int], num_prefix: int,
                          num_eval: int) -> Any:
    """Log-probs ``[num_eval, vocab]`` of the tokens after the prefix, given cache ``kv``."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for i in range(kv.shape[0]):
        k = torch.from_numpy(np.ascontiguousarray(kv[i, 0], dtype=np.float32))[None]
        v = torch.from_numpy(np.ascontiguousarray(kv[i, 1], dtype=np.float32))[None]
        cache.update(k, v, i)
    x = torch.tensor([ids[num_prefix : num_prefix + num_eval]])
    with torch.no_grad():
        logits = model(x, past_key_values=cache, use_cache=True).logits[0].float()
    return torch.log_softmax(logits, -1)


def kl_div(ref: Any, other: Any) -> float:
    """Mean KL(ref || other) over positions, nats."""
    return float((ref.exp() * (ref - other)).sum(-1).mean())


def roundtrip_layers(kv: np.ndarray, layers: range, kv_index: int, bins: int,
                     chunk_tokens: int = 256) -> np.ndarray:
    """Copy of kv with one K|V of the given layers quantised through the codec."""
    out = kv.copy()
    heads, tokens, dim = kv.shape[2:]
    kind = sec.KIND_KEYS if kv_index == 0 else value_kind(dim)
    for layer in layers:
        for t0 in range(0, tokens - chunk_tokens + 1, chunk_tokens):
            x = np.ascontiguousarray(kv[layer, kv_index, :, t0 : t0 + chunk_tokens])
            x = x.astype(np.float16).astype(np.float32)
            buf = memoryview(sec.encode_section(x, kind, bins))
            sec.decode_section(buf, kind, heads, chunk_tokens, dim,
                               out[layer, kv_index, :, t0 : t0 + chunk_tokens])
    return out


def measure_sensitivity(num_prefix: int, num_eval: int, offset: int, group_layers: int
                        ) -> tuple[KVLayout, dict[str, list[float]]]:
    """KL per (layer group, K|V) with that group alone at REFERENCE_BINS."""
    import torch

    from kvstore.integrations.smollm2 import load_smollm2, sample_tokens

    model, tokenizer = load_smollm2()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    ids = sample_tokens(tokenizer, num_prefix + num_eval, offset)
    kv = prefill(model, ids, num_prefix).astype(np.float16).astype(np.float32)
    layout = KVLayout(kv.shape[0], kv.shape[2], kv.shape[4], "float16", 256)
    ref = continuation_logprobs(model, kv, ids, num_prefix, num_eval)
    sens: dict[str, list[float]] = {"k": [], "v": []}
    for kv_index, name in ((0, "k"), (1, "v")):
        for g0 in range(0, layout.num_layers, group_layers):
            layers = range(g0, min(g0 + group_layers, layout.num_layers))
            q = roundtrip_layers(kv, layers, kv_index, REFERENCE_BINS[kv_index])
            kl = kl_div(ref, continuation_logprobs(model, q, ids, num_prefix, num_eval))
            log.info("%s layers %d-%d: KL %.5f", name, layers[0], layers[-1], kl)
            sens[name].append(kl)
    return layout, sens
