"""RAG chunk-cache reuse: position-free chunk KV, RoPE re-encoding, selective recompute (§7).

The prompt is ``prefix + chunk_1 + ... + chunk_n + query``.

- **Prefix** (system prompt, instructions): its stored full chunks are loaded
  through the prefix hash chain (exact KV); the rest of it is computed exactly
  inside the blend pass (no separate forward) and its new full chunks are stored.
- **Chunks** (retrieved passages, token ids of any length): each is stored under
  its position-free key ``H(namespace, "chunk", tokens)`` so it hits wherever it
  appears. A missing chunk is computed alone (positions 0..n-1, nothing before
  it) and stored; the stored keys are *post-RoPE rotated back to position 0*
  (one inverse rotation of the model's cache, no hooks into the attention, and
  the same keys a pre-RoPE store would give times the rope's constant scaling).
  At use, keys are rotated to the chunk's real positions with the model's RoPE
  (``kvstore.integrations._rope``; unknown or length-dependent rope types raise
  InvalidArgument).
- **Blend**: a chunk computed alone never attended to what precedes it. The
  ``recompute_ratio`` share of chunk tokens is recomputed on every layer with the
  real model, in the same per-layer pass that prefills the query
  (``kvstore.integrations._blend``): those whose layer-1 KV deviates most
  from a fresh computation (with ``query_aware``: half of them, half the stale
  tokens the query reads most, from a short probe of the query against the
  reused KV). ``recompute_ratio=1.0`` is a full prefill; ``0.0`` keeps every
  reused entry.

Stored KV uses the client layout's dtype (float16 recommended, see
kvstore.integrations.transformers). :func:`build_cache_naive` is the baseline the
tests and bench/bench_rag.py compare against: chunk caches concatenated as
computed alone, no rotation, no recompute.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvstore.errors import InvalidArgument
from kvstore.integrations._blend import blend
from kvstore.integrations._rope import (
    MASKED_ATTENTION_IMPLS,
    RopeSpec,
    check_layout,
    rope_spec,
    rotate_keys,
)
from kvstore.integrations.transformers import (
    as_token_list,
    cache_from_kv,
    kv_from_cache,
    prefill,
    store_new_chunks,
)

log = logging.getLogger(__name__)

_TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True, slots=True)
class RagStats:
    """Where the KV of each prompt token came from in one :func:`build_cache` call."""

    num_prefix_tokens: int  # tokens of the shared prefix
    num_chunk_tokens: int  # tokens of all retrieved chunks
    num_query_tokens: int  # tokens of the query
    num_reused: int  # context tokens whose stored KV is in the cache unchanged (layers >= 1)
    num_recomputed: int  # chunk tokens recomputed on every layer by the blend
    num_prefilled: int  # tokens run through the model as a plain prefill (query, prefix misses)
    num_chunks_hit: int  # chunks found in the store
    num_chunks_encoded: int  # chunks missing from the store: computed alone and stored


@dataclass(frozen=True, slots=True)
class _Context:
    """KV of prefix + chunks, keys at their real positions, then ``room`` zero entries for the
    query; prefix tokens past the stored ones are zero placeholders (computed by the blend)
    unless the prefix was prefilled exactly."""

    kv: torch.Tensor  # [layers, 2, heads, ctx + room, dim], model dtype
    num_prefix_stored: int  # leading prefix tokens whose KV came from the store
    num_chunks_hit: int


def _check_inputs(model: Any, client: Any, chunks: Any, query: Any, ratio: float) -> None:
    check_layout(model, client.layout)
    impl = getattr(model.config, "_attn_implementation", None)
    if impl not in MASKED_ATTENTION_IMPLS:
        raise InvalidArgument(
            f"attention implementation {impl!r} ignores explicit masks; load the model with "
            f"attn_implementation in {sorted(MASKED_ATTENTION_IMPLS)}"
        )
    if not chunks or any(len(c) == 0 for c in chunks):
        raise InvalidArgument("chunks must be a non-empty list of non-empty token-id lists")
    if len(query) == 0:
        raise InvalidArgument("query is empty; the next-token logits need at least one token")
    if not 0.0 <= ratio <= 1.0:
        raise InvalidArgument(f"recompute_ratio must be in [0, 1], got {ratio}")


def _encode_chunk(model: Any, chunk: list[int], spec: RopeSpec) -> torch.Tensor:
    """KV of ``chunk`` computed alone, keys rotated to position 0: [layers, 2, heads, n, dim]"""
    device = next(model.parameters()).device
    out = model(input_ids=torch.tensor([chunk], device=device), use_cache=True, logits_to_keep=1)
    kv = kv_from_cache(out.cache, 0, len(chunk), next(model.parameters()).dtype)
    kv[:, 0] = rotate_keys(kv[:, 0], spec, torch.arange(len(chunk)), inverse=True)
    return kv


def _chunk_kv(
    model: Any, client: Any, chunk: list[int], spec: RopeSpec
) -> tuple[torch.Tensor, bool]:
    """(position-0 KV of ``chunk`` in the model's dtype, whether it came from the store)."""
    model_dtype = next(model.parameters()).dtype
    stored = client.get_chunk(chunk)
    if stored is not None:
        return torch.as_tensor(stored).to(model_dtype), True
    kv = _encode_chunk(model, chunk, spec)
    client.put_chunk(chunk, kv.to(_TORCH_DTYPES[client.layout.dtype]))
    # Use what the store holds, so a hit and a miss give the same cache.
    return kv.to(_TORCH_DTYPES[client.layout.dtype]).to(model_dtype), False


def _prefix_kv(model: Any, client: Any, prefix: list[int], exact: bool) -> tuple[torch.Tensor, int]:
    """(prefix KV [layers, 2, heads, P, dim] in the model dtype, leading tokens from the store).

    ``exact`` prefills the unstored tail now; otherwise it is left as zero placeholders
    for the blend to compute in its single pass (no extra forward of the model).
    """
    model_dtype = next(model.parameters()).dtype
    if exact:
        cache, _, num_stored = prefill(model, prefix, client)
        return kv_from_cache(cache, 0, len(prefix), model_dtype), num_stored
    num_full = len(prefix) // client.layout.chunk_tokens * client.layout.chunk_tokens
    stored = client.get(prefix[:num_full]) if num_full else None
    num_stored = 0 if stored is None else stored.shape[3]
    kv = torch.zeros(client.layout.shape(len(prefix)), dtype=model_dtype)
    if stored is not None:
        kv[:, :, :, :num_stored] = torch.as_tensor(stored)
    return kv, num_stored


def _load_context(
    model: Any,
    client: Any,
    prefix: list[int],
    chunks: list[list[int]],
    spec: RopeSpec,
    naive: bool = False,
    room: int = 0,
) -> _Context:
    num_ctx = len(prefix) + sum(len(c) for c in chunks)
    model_dtype = next(model.parameters()).dtype
    # One buffer for the whole prompt, so the blend's cache needs no copy of it.
    kv = torch.empty(client.layout.shape(num_ctx + room), dtype=model_dtype)
    kv[:, :, :, num_ctx:] = 0
    num_prefix_stored = 0
    if prefix:
        prefix_kv, num_prefix_stored = _prefix_kv(model, client, prefix, exact=naive)
        kv[:, :, :, : len(prefix)] = prefix_kv
    start, hits = len(prefix), 0
    for chunk in chunks:
        chunk_kv, hit = _chunk_kv(model, client, chunk, spec)
        hits += hit
        stop = start + len(chunk)
        kv[:, 1, :, start:stop] = chunk_kv[:, 1]
        # The naive baseline leaves keys where the chunk was computed (0..n-1).
        offset = 0 if naive else start
        positions = torch.arange(offset, offset + len(chunk))
        kv[:, 0, :, start:stop] = rotate_keys(chunk_kv[:, 0], spec, positions)
        start = stop
    return _Context(kv, num_prefix_stored, hits)


@torch.inference_mode()
def build_cache(
    model: Any,
    client: Any,
    chunks: Sequence[Sequence[int]],
    query: Sequence[int] | torch.Tensor,
    prefix: Sequence[int] | torch.Tensor | None = None,
    recompute_ratio: float = 0.15,
    query_aware: bool = False,
) -> tuple[Any, torch.Tensor, RagStats]:
    """A ready cache for ``prefix + chunks + query`` built from stored chunk KV.

    Args:
        model: a Llama-style transformers causal LM (sdpa or eager attention).
        client: a connected ``kvstore.Client`` whose layout matches the model.
        chunks: retrieved passages, each a list of token ids (any length >= 1).
        query: the question's token ids (>= 1 token); prefilled on top.
        prefix: optional leading tokens (system prompt), reused by prefix chain.
        recompute_ratio: share of chunk tokens recomputed with the real model.
        query_aware: give half of the recompute to stale tokens the query reads most
            (a short probe first: lower KL to a full prefill for ~2.5% of its time
            on SmolLM2; see kvstore.integrations._blend).

    Returns:
        ``(cache, logits, stats)``: a DynamicCache of the whole prompt, the
        next-token logits after it (``[vocab]``, float32) and a :class:`RagStats`.

    Raises:
        InvalidArgument: bad inputs, a layout that does not fit the model, or a
            model whose RoPE or attention this module cannot handle.
    """
    spec = rope_spec(model)
    chunk_ids = [as_token_list(c) for c in chunks]
    query_ids, prefix_ids = as_token_list(query), as_token_list(prefix or [])
    _check_inputs(model, client, chunk_ids, query_ids, recompute_ratio)
    ctx = _load_context(model, client, prefix_ids, chunk_ids, spec, room=len(query_ids))
    num_chunk_tokens = sum(len(c) for c in chunk_ids)
    num_prefix = len(prefix_ids)
    candidates = torch.zeros(num_prefix + num_chunk_tokens, dtype=torch.bool)
    candidates[num_prefix:] = True
    forced = torch.zeros_like(candidates)
    forced[ctx.num_prefix_stored : num_prefix] = True
    num_select = round(recompute_ratio * num_chunk_tokens)
    ids = prefix_ids + [t for c in chunk_ids for t in c] + query_ids
    cache, logits, num_recomputed = blend(
        model, ids, ctx.kv, candidates, forced, num_select, query_aware
    )
    if num_prefix:
        store_new_chunks(client, prefix_ids, cache, ctx.num_prefix_stored)
    stats = RagStats(
        num_prefix_tokens=num_prefix,
        num_chunk_tokens=num_chunk_tokens,
        num_query_tokens=len(query_ids),
        num_reused=ctx.num_prefix_stored + num_chunk_tokens - num_recomputed,
        num_recomputed=num_recomputed,
        num_prefilled=len(query_ids) + num_prefix - ctx.num_prefix_stored,
        num_chunks_hit=ctx.num_chunks_hit,
        num_chunks_encoded=len(chunk_ids) - ctx.num_chunks_hit,
    )
    log.debug("build_cache: %s", stats)
    return cache, logits, stats


@torch.inference_mode()
def build_cache_naive(
    model: Any,
    client: Any,
    chunks: Sequence[Sequence[int]],
    query: Sequence[int] | torch.Tensor,
    prefix: Sequence[int] | torch.Tensor | None = None,
) -> tuple[Any, torch.Tensor]:
    """Baseline: chunk caches concatenated as computed alone (no rotation, no recompute).

    Same arguments as :func:`build_cache`; returns ``(cache, logits)``.
    """
    spec = rope_spec(model)
    chunk_ids = [as_token_list(c) for c in chunks]
    query_ids, prefix_ids = as_token_list(query), as_token_list(prefix or [])
    _check_inputs(model, client, chunk_ids, query_ids, 0.0)
    ctx = _load_context(model, client, prefix_ids, chunk_ids, spec, naive=True)
    cache = cache_from_kv(model, ctx.kv)
    device = next(model.parameters()).device
    out = model(
        input_ids=torch.tensor([query_ids], device=device),
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    return cache, out.logits[0, -1].float()
