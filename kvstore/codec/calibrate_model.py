"""Calibration measurements for ``kvstore calibrate`` on the real model (SmolLM2).

Shared with the codec benchmark: exact cache, KL and perplexity with a decoded cache.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvstore._progress import Progress
from kvstore.codec import section as sec
from kvstore.codec.calibrate import (
    REFERENCE_BINS,
    CalibrationTable,
    make_table,
    normalise_weights,
)
from kvstore.codec.kvq import value_kind
from kvstore.codec.levels import LEVELS
from kvstore.layout import KVLayout

log = logging.getLogger(__name__)
BinsOf = Callable[[int, int], "int | None"]  # (layer, K=0|V=1) -> bins, None = exact


def prefill(model: Any, ids: list[int], num_prefix: int) -> np.ndarray:
    """Exact cache of the prefix, float32 ``[layers, 2, heads, tokens, dim]``."""
    import torch

    from kvstore.models.cache import kv_from_cache

    with torch.no_grad():
        out = model(torch.tensor([ids[:num_prefix]]), use_cache=True)
    return kv_from_cache(out.past_key_values, 0, num_prefix, torch.float32).numpy()


def continuation_logprobs(model: Any, kv: np.ndarray, ids: list[int], num_prefix: int,
                          num_eval: int) -> Any:
    """Log-probs ``[num_eval, vocab]`` of the tokens after the prefix, given cache ``kv``."""
    import torch

    from kvstore.models.cache import cache_from_kv

    cache = cache_from_kv(model, torch.from_numpy(np.ascontiguousarray(kv, dtype=np.float32)))
    x = torch.tensor([ids[num_prefix : num_prefix + num_eval]])
    with torch.no_grad():
        logits = model(x, past_key_values=cache, use_cache=True).logits[0].float()
    return torch.log_softmax(logits, -1)


def kl_div(ref: Any, other: Any) -> float:
    """Mean KL(ref || other) over positions, nats."""
    return float((ref.exp() * (ref - other)).sum(-1).mean())


def query_mean_squares(model: Any, kv: np.ndarray, ids: list[int], num_prefix: int,
                       num_eval: int) -> tuple[Any, np.ndarray]:
    """Log-probs of the continuation and the mean squared post-RoPE query per key
    channel, ``[layers, kv_heads * head_dim]`` (summed over the query heads that
    share a kv head): what a key error in that channel is multiplied by."""
    import torch

    from kvstore.models.arch import text_config
    from kvstore.models.llama import capture_queries
    from kvstore.models.rope import rotate_half

    cfg = text_config(model)
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    dim = model.model.layers[0].self_attn.head_dim
    logp, captured = capture_queries(
        model, lambda: continuation_logprobs(model, kv, ids, num_prefix, num_eval))
    positions = torch.arange(num_prefix, num_prefix + num_eval)[None]
    rows = []
    for q in captured:
        q = q.view(1, num_eval, heads, dim).transpose(1, 2).float()
        cos, sin = model.model.rotary_emb(q, positions)
        q = q * cos[:, None] + rotate_half(q) * sin[:, None]
        ms = (q[0] ** 2).mean(1)  # [heads, dim]
        rows.append(ms.view(kv_heads, heads // kv_heads, dim).sum(1).reshape(-1).numpy())
    return logp, np.stack(rows).astype(np.float64)


def roundtrip_layers(kv: np.ndarray, bins_of: BinsOf, key_weights: np.ndarray | None = None,
                     chunk_tokens: int = 256) -> np.ndarray:
    """Copy of kv with the (layer, K|V) that ``bins_of`` names quantised through the codec."""
    out = kv.copy()
    num_layers, _, heads, tokens, dim = kv.shape
    for layer in range(num_layers):
        for kv_index in (0, 1):
            bins = bins_of(layer, kv_index)
            if bins is None:
                continue
            kind = sec.KIND_KEYS if kv_index == 0 else value_kind(dim)
            weights = key_weights[layer] if key_weights is not None and kv_index == 0 else None
            for t0 in range(0, tokens - chunk_tokens + 1, chunk_tokens):
                x = np.ascontiguousarray(kv[layer, kv_index, :, t0 : t0 + chunk_tokens])
                x = x.astype(np.float16).astype(np.float32)
                buf = memoryview(sec.encode_section(x, kind, bins, weights))
                sec.decode_section(buf, kind, heads, chunk_tokens, dim,
                                   out[layer, kv_index, :, t0 : t0 + chunk_tokens])
    return out


@dataclass(slots=True)
class _Sample:
    ids: list[int]
    kv: np.ndarray  # exact cache, float16-rounded, float32
    ref: Any  # log-probs of the continuation with the exact cache


def calibrate(model_name: str, num_prefix: int, num_eval: int, offsets: Sequence[int],
              group_layers: int, progress: bool = True) -> CalibrationTable:
    """Measure key weights and group sensitivities on samples at ``offsets`` and build
    a table (calibrate.py describes the three steps); ``progress`` draws a bar on a
    terminal's stderr."""
    import torch

    from kvstore.models.smollm2 import load_smollm2

    model, tokenizer = load_smollm2()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    num_groups = -(-model.config.num_hidden_layers // group_layers)
    num_levels = sum(1 for level in LEVELS.values() if level.level_id)
    with Progress("calibrate: prefill samples", len(offsets) + 2 * num_groups + num_levels,
                  enabled=progress) as bar:
        return _calibrate(model, tokenizer, model_name, num_prefix, num_eval, offsets,
                          group_layers, bar)


def _calibrate(model: Any, tokenizer: Any, model_name: str, num_prefix: int, num_eval: int,
               offsets: Sequence[int], group_layers: int, bar: Progress) -> CalibrationTable:
    from kvstore.models.smollm2 import sample_tokens

    samples, mean_squares = [], []
    for offset in offsets:
        ids = sample_tokens(tokenizer, num_prefix + num_eval, offset)
        kv = prefill(model, ids, num_prefix).astype(np.float16).astype(np.float32)
        ref, ms = query_mean_squares(model, kv, ids, num_prefix, num_eval)
        samples.append(_Sample(ids, kv, ref))
        mean_squares.append(ms)
        bar.advance(description="calibrate: sensitivity per layer group")
    num_layers, heads, dim = samples[0].kv.shape[0], samples[0].kv.shape[2], samples[0].kv.shape[4]
    layout = KVLayout(num_layers, heads, dim, "float16", 256)
    key_weights = normalise_weights(np.sqrt(np.mean(mean_squares, axis=0)))
    weights = np.asarray(key_weights)

    def mean_kl(bins_of: BinsOf) -> float:
        kls = [kl_div(s.ref, continuation_logprobs(
                   model, roundtrip_layers(s.kv, bins_of, weights), s.ids, num_prefix, num_eval))
               for s in samples]
        return float(np.mean(kls))

    sens: dict[str, list[float]] = {"k": [], "v": []}
    for kv_index, name in ((0, "k"), (1, "v")):
        for g0 in range(0, num_layers, group_layers):
            group = range(g0, min(g0 + group_layers, num_layers))
            kl = mean_kl(lambda layer, i, group=group, kv_index=kv_index: (
                REFERENCE_BINS[kv_index] if i == kv_index and layer in group else None))
            log.info("%s layers %d-%d: KL %.5f", name, group[0], group[-1], kl)
            sens[name].append(kl)
            bar.advance(description="calibrate: levels")
    first = make_table(model_name, layout, group_layers, sens, key_weights)
    targets = {}
    for level in LEVELS.values():
        if not level.level_id:
            continue
        kl = mean_kl(lambda layer, i, level=level.name: first.bins(level, layer, i))
        # One correction: shrink the target by the miss (KL ∝ step**2 near the target).
        targets[level.name] = level.target_kl * min(1.0, level.target_kl / kl)
        log.info("%s: measured KL %.5f (target %.5f) -> allocation target %.5f",
                 level.name, kl, level.target_kl, targets[level.name])
        bar.advance()
    return make_table(model_name, layout, group_layers, sens, key_weights, targets)
