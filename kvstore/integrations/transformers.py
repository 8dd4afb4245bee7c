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
import sys
import threading
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from kvstore.errors import InvalidArgument, KVStoreError
from kvstore.models.arch import check_layout, layout_for
from kvstore.models.cache import cache_from_kv, kv_from_cache
from kvstore.models.dtypes import torch_dtype

log = logging.getLogger(__name__)

__all__ = ["as_token_list", "cache_from_kv", "generate", "kv_from_cache", "layout_for",
           "load_prefix", "prefill", "store_new_chunks"]


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


def _storage_tensor(arr: Any) -> torch.Tensor:
    """A read-only numpy view of stored KV as a torch tensor of the stored dtype (no copy)."""
    with warnings.catch_warnings():  # read-only arena views: we never write through them
        warnings.simplefilter("ignore", UserWarning)
        if arr.dtype == np.uint16:  # bfloat16 bits
            return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(arr)


# Buffers the in-place load converts into, one per recent (shape, dtype), reused once
# nothing references them any more. *Why:* a fresh 94 MB float32 tensor (2048 SmolLM2
# tokens) faults every page on its first write; on this project's VM that cost more
# than the rest of the load (scratch measurement: torch.empty + fill 160-280 ms against
# a 13-48 ms get, under load). A loaded cache's tensors are views of the buffer until
# the model's first forward replaces them (DynamicLayer.update concatenates), so the
# buffer is free again right after the prefill that loaded it.
_BUFFERS: dict[tuple[tuple[int, ...], torch.dtype], torch.Tensor] = {}
_BUFFERS_LOCK = threading.Lock()
_MAX_BUFFERS = 2
# References to a buffer taken out of the pool that no one else holds: the local name
# and getrefcount's argument. Every view of it (a cache's layers) holds it as ``_base``.
_FREE_REFS = 2


def _load_buffer(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A ``shape`` tensor of ``dtype`` no one else references: pooled (warm) if possible."""
    key = (shape, dtype)
    with _BUFFERS_LOCK:
        buf = _BUFFERS.pop(key, None)
        if buf is None or sys.getrefcount(buf) > _FREE_REFS:  # still viewed by a cache
            with torch.inference_mode(False):  # writable in and out of inference mode
                buf = torch.empty(shape, dtype=dtype)
        _BUFFERS[key] = buf  # most recent last
        while len(_BUFFERS) > _MAX_BUFFERS:
            del _BUFFERS[next(iter(_BUFFERS))]
        return buf


def _load_in_place(model: Any, client: Any, ids: list[int]) -> torch.Tensor | None:
    """The stored prefix of ``ids`` converted straight from the daemon's arena into one
    ``[layers, 2, heads, n, dim]`` tensor of the model's dtype; None when there is no
    same-host view of every stored chunk (then ``get`` is the way).

    *Why:* a ``get`` copies the chunks into a new tensor of the stored dtype, and the
    cache then needs a second pass to convert them; here each chunk is verified and
    converted while in cache, with one pass over the arena and one write.
    """
    if getattr(client, "view", None) is None:
        return None
    try:
        with client.view(ids, verify=False) as view:
            if not view.chunks or len(view.chunks) < view.lease.num_chunks_stored:
                return None
            param = next(model.parameters())
            first = view.chunks[0]  # [layers, 2, heads, T, dim]
            per_chunk = first.shape[3]
            out = _load_buffer((*first.shape[:3], view.num_tokens, first.shape[4]),
                               param.dtype)
            for index, chunk in enumerate(view.chunks):
                view.verify(index)  # the chunk is then in cache for the conversion
                span = slice(index * per_chunk, (index + 1) * per_chunk)
                with torch.no_grad():
                    out[:, :, :, span].copy_(_storage_tensor(chunk))
    except KVStoreError as exc:  # not on this host, refused, compressed or corrupt chunks
        log.debug("no in-place load of the prefix (%s); using get", exc)
        return None
    return out if param.device.type == "cpu" else out.to(param.device)


def load_prefix(model: Any, client: Any, ids: list[int]) -> tuple[Any, int, int]:
    """(cache or None, tokens to reuse, tokens stored) for the longest stored prefix of ``ids``."""
    num_full = len(ids) // client.layout.chunk_tokens * client.layout.chunk_tokens
    if not num_full:
        return None, 0, 0
    kv = _load_in_place(model, client, ids[:num_full])
    if kv is None:
        # get() returns the leading stored chunks, so no separate lookup round trip.
        kv = client.get(ids[:num_full])
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
    cache, num_reused, num_stored = load_prefix(model, client, ids)
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
