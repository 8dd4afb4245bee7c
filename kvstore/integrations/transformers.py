"""Prefix reuse for HF transformers: load the longest stored prefix, prefill only the rest.

Decisions (measured on SmolLM2-135M, float32, CPU; see bench/bench_ttft.py):

- **Stored dtype is the client's layout dtype.** Keys and values are cast to it on
  ``put`` and back to the model's dtype on ``get``. A float32 layout is exact: the
  next-token logits of a fully stored prefix match a full prefill to ~3e-5 (only
  the matmul blocking differs). A float16 layout halves the bytes moved and
  stored and shifts the logits by ~5e-3 (max abs) without changing the top-1
  token on the test prompts; it is the recommended default for float32 and
  float16 models alike (:func:`layout_for`). Use float32 where exact reuse
  matters, bfloat16 for bfloat16 models.
- **Prefix chunks hold post-RoPE keys** exactly as the model's cache holds them:
  a prefix chunk is only ever used at the positions it was computed at, so no
  re-encoding is needed (RAG chunks are different, see kvstore.rag).
- **A fully stored prompt still runs its last token.** The logits of the last
  prompt token are not stored, so when every token is stored the cache is loaded
  for all but the last one and that token is run through the model (one decode
  step, as vLLM does); ``num_reused`` is then ``len(input_ids) - 1``.
- New full chunks are stored after the logits are computed; chunks that were
  already stored are not sent again.

Batch size 1; ``input_ids`` may be a list of ints, a 1-D tensor or a ``[1, T]`` tensor.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from kvstore.errors import InvalidArgument
from kvstore.models.arch import check_layout, layout_for
from kvstore.models.cache import cache_from_kv, kv_from_cache
from kvstore.models.dtypes import torch_dtype

log = logging.getLogger(__name__)

__all__ = ["as_token_list", "cache_from_kv", "generate", "kv_from_cache", "layout_for",
           "prefill", "store_new_chunks"]


def as_token_list(input_ids: Sequence[int] | torch.Tensor) -> list[int]:
    """Token ids of one sequence as a list of ints (batch size 1 only)."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 2 and input_ids.shape[0] == 1:
            input_ids = input_ids[0]
        if input_ids.dim() != 1:
            raise InvalidArgument(
                f"input_ids must be [T] or [1, T] (batch size 1), got {tuple(input_ids.shape)}"
            )
        return [int(t) for t in input_ids.tolist()]
    return [int(t) for t in input_ids]


def _load_prefix(model: Any, client: Any, ids: list[int]) -> tuple[Any, int, int]:
    """(cache or None, tokens to reuse, tokens stored) for the longest stored prefix of ``ids``."""
    num_full = len(ids) // client.layout.chunk_tokens * client.layout.chunk_tokens
    # get() returns the leading stored chunks, so no separate lookup round trip.
    kv = client.get(ids[:num_full]) if num_full else None
    if kv is None:  # a miss is a result, not an error
        return None, 0, 0
    kv = torch.as_tensor(kv)
    num_stored = kv.shape[3]
    num_reused = min(num_stored, len(ids) - 1)  # the last token always runs (its logits)
    return cache_from_kv(model, kv[:, :, :, :num_reused]), num_reused, num_stored


def store_new_chunks(client: Any, ids: list[int], cache: Any, num_stored: int) -> None:
    """Store the full chunks of ``ids`` past the first ``num_stored`` tokens, KV from ``cache``."""
    chunk = client.layout.chunk_tokens
    num_full = len(ids) // chunk * chunk
    if num_full <= num_stored:
        return
    dtype = torch_dtype(client.layout.dtype)
    kv = kv_from_cache(cache, 0, num_full, dtype)
    stored = client.put(ids[:num_full], kv)
    log.debug("stored %d prefix tokens (%d were already stored)", stored, num_stored)


@torch.inference_mode()
def prefill(
    model: Any, input_ids: Sequence[int] | torch.Tensor, client: Any
) -> tuple[Any, torch.Tensor, int]:
    """Prefill ``input_ids`` reusing the longest prefix stored in the daemon.

    Args:
        model: a transformers causal LM whose cache is full-attention DynamicLayers.
        input_ids: one sequence of token ids (list, ``[T]`` or ``[1, T]`` tensor), T >= 1.
        client: a connected ``kvstore.Client`` whose layout matches the model.

    Returns:
        ``(cache, logits, num_reused)``: a DynamicCache holding all T tokens, the
        next-token logits after the whole prompt (``[vocab]``, float32), and how many
        leading tokens' KV came from the store.

    Raises:
        InvalidArgument: empty input, batch > 1, or a layout that does not fit the model.
    """
    ids = as_token_list(input_ids)
    if not ids:
        raise InvalidArgument("input_ids is empty; prefill needs at least one token")
    check_layout(model, client.layout)
    cache, num_reused, num_stored = _load_prefix(model, client, ids)
    if cache is None:
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
    device = next(model.parameters()).device
    rest = torch.tensor([ids[num_reused:]], device=device)
    out = model(input_ids=rest, cache=cache, use_cache=True, logits_to_keep=1)
    logits = out.logits[0, -1].float()
    store_new_chunks(client, ids, cache, num_stored)
    log.debug("prefill: %d tokens, %d reused, %d computed", len(ids), num_reused, len(rest[0]))
    return cache, logits, num_reused


@torch.inference_mode()
def generate(
    model: Any, input_ids: Sequence[int] | torch.Tensor, client: Any, **generate_kwargs: Any
) -> torch.Tensor:
    """``model.generate`` on top of :func:`prefill`: a stored prefix is loaded, not recomputed.

    Args:
        model, input_ids, client: as for :func:`prefill`.
        **generate_kwargs: passed to ``model.generate`` (``max_new_tokens``, ``do_sample``...).

    Returns:
        ``[1, T + new]`` token ids, prompt included, as ``model.generate`` returns them.
    """
    ids = as_token_list(input_ids)
    cache, _, _ = prefill(model, ids, client)
    # generate() runs at least one uncached token to get its first logits; hand it
    # the cache without the last prompt token (one decode step of work).
    cache.crop(-1)
    device = next(model.parameters()).device
    prompt = torch.tensor([ids], device=device)
    mask = torch.ones_like(prompt)
    return model.generate(input_ids=prompt, attention_mask=mask, cache=cache, **generate_kwargs)
