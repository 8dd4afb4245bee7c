"""A RAG prompt's cache from stored chunk KV: RoPE re-encoding, selective recompute (§7).

The prompt is ``prefix + chunk_1 + ... + chunk_n + query``.

- **Prefix** (system prompt, instructions): its stored full chunks are loaded
  through the prefix hash chain (exact KV); the rest of it is computed exactly
  inside the blend pass (no separate forward) and its new full chunks are stored.
- **Chunks** (retrieved passages, token ids of any length): a missing chunk is
  computed after a *lead* (``chunk_lead``; by default the prefix) at positions
  L..L+n-1 and only its own rows are kept; the stored keys are *post-RoPE rotated
  back to position 0* (one inverse rotation of the model's cache, no hooks into the
  attention). It is stored under the position-free key of ``tag(lead) + tokens``
  (``tag``: 4 negative ids naming the lead, zero KV rows; no tag for an empty lead),
  so it hits wherever it appears after the same lead. Computed with nothing before
  it, a chunk's first token plays the attention sink; after the prefix, the first
  chunk's KV is exact and the others are conditioned on the real start of the prompt
  (SmolLM2, bench prompts, ratio 0.15: mean KL to a full prefill 0.0287 -> 0.0159,
  held-out prompts unchanged; a lone BOS or endoftext lead did worse than none).
  At use, keys are rotated to the
  chunk's real positions with the model's RoPE (``kvstore.models.rope``;
  unknown or length-dependent rope types raise InvalidArgument).
- **Blend**: a stored chunk never attended to the chunks before it. Some chunk
  tokens are recomputed on every layer with the real model, in the same per-layer
  pass that prefills the query (``kvstore.rag.blend``): those whose layer-1 KV
  deviates most from a fresh computation; how many is adaptive by default (those
  deviating past a threshold, within the caller's ``min_speedup`` TTFT budget,
  ``kvstore.rag.budget``) or a fixed ``recompute_ratio`` (with ``query_aware``:
  half of them, half the stale tokens the query reads most, from a short probe of
  the query against the reused KV). ``recompute_ratio=1.0`` is a full prefill; ``0.0`` keeps every
  reused entry.

Stored KV uses the client layout's dtype (float16 recommended, see
kvstore.integrations.transformers). :func:`build_cache_naive` is the baseline the
tests and bench/bench_rag.py compare against: chunk caches concatenated as
computed alone, no rotation, no recompute.
"""

from __future__ import annotations

import hashlib
import logging
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvstore._progress import track
from kvstore.errors import InvalidArgument
from kvstore.integrations.transformers import as_token_list, prefill, store_new_chunks
from kvstore.models.arch import MASKED_ATTENTION_IMPLS, check_layout
from kvstore.models.cache import cache_from_kv, kv_from_cache
from kvstore.models.dtypes import TORCH_DTYPES
from kvstore.models.rope import RopeSpec, rope_spec, rotate_keys
from kvstore.rag.blend import blend
from kvstore.rag.budget import DEFAULT_MIN_SPEEDUP, cost_model, plan_recompute

log = logging.getLogger(__name__)

PROGRESS_MIN_PASSAGES = 8  # fewer load in a blink: no bar
_NUM_TAG_TOKENS = 4  # key tokens naming a chunk's lead (31 bits each)


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
    recompute_ratio: float  # num_recomputed / num_chunk_tokens, as chosen for this prompt
    max_recompute_ratio: float  # the most the budget (or the fixed ratio) allowed
    predicted_speedup: float  # over a full prefill, by kvstore.rag.budget.cost_model() (hits only)


@dataclass(frozen=True, slots=True)
class _Context:
    """KV of prefix + chunks, keys at their real positions, then ``room`` zero entries for the
    query; prefix tokens past the stored ones are zero placeholders (computed by the blend)
    unless the prefix was prefilled exactly."""

    kv: torch.Tensor  # [layers, 2, heads, ctx + room, dim], model dtype
    num_prefix_stored: int  # leading prefix tokens whose KV came from the store
    num_chunks_hit: int


def _check_inputs(
    model: Any, client: Any, chunks: Any, query: Any, ratio: float | None, lead: list[int]
) -> None:
    check_layout(model, client.layout)
    impl = getattr(model.config, "_attn_implementation", None)
    if impl not in MASKED_ATTENTION_IMPLS:
        raise InvalidArgument(
            f"attention implementation {impl!r} ignores explicit masks; load the model with "
            f"attn_implementation in {sorted(MASKED_ATTENTION_IMPLS)}"
        )
    if not chunks or any(len(c) == 0 for c in chunks):
        raise InvalidArgument("chunks must be a non-empty list of non-empty token-id lists")
    # Negative ids are reserved for the lead tag in chunk keys (see _lead_tag).
    for name, ids in [*(("chunk", c) for c in chunks), ("chunk_lead", lead)]:
        if ids and not 0 <= min(ids) <= max(ids) < 2**31:
            raise InvalidArgument(
                f"{name} token ids must be in [0, 2**31), got {min(ids)}..{max(ids)}"
            )
    if len(query) == 0:
        raise InvalidArgument("query is empty; the next-token logits need at least one token")
    if ratio is not None and not 0.0 <= ratio <= 1.0:
        raise InvalidArgument(f"recompute_ratio must be in [0, 1], got {ratio}")


class _ChunkEncoder:
    """Computes missing chunks after a lead: the lead's KV once, then each chunk on top of it."""

    def __init__(self, model: Any, lead: list[int], spec: RopeSpec) -> None:
        self.model, self.lead, self.spec = model, lead, spec
        self.lead_kv: torch.Tensor | None = None  # [layers, 2, heads, lead, dim], on first miss

    def encode(self, chunk: list[int]) -> torch.Tensor:
        """KV of ``chunk`` after the lead, keys rotated to position 0: [layers, 2, heads, n, dim]"""
        model, start = self.model, len(self.lead)
        param = next(model.parameters())
        cache = None
        if self.lead:
            if self.lead_kv is None:
                out = model(
                    input_ids=torch.tensor([self.lead], device=param.device), use_cache=True
                )
                self.lead_kv = kv_from_cache(out.cache, 0, start, param.dtype)
            cache = cache_from_kv(model, self.lead_kv)  # the forward appends: lead_kv unchanged
        out = model(
            input_ids=torch.tensor([chunk], device=param.device),
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        kv = kv_from_cache(out.cache, start, start + len(chunk), param.dtype)
        positions = torch.arange(start, start + len(chunk))
        kv[:, 0] = rotate_keys(kv[:, 0], self.spec, positions, inverse=True)
        return kv


def _lead_tag(lead: list[int]) -> list[int]:
    """Key tokens naming what a chunk was computed after: none for no lead, else
    ``_NUM_TAG_TOKENS`` negative ids (124 bits of SHA-256 of the lead's tokens).

    Token ids are >= 0 (checked), so a tagged key never equals an untagged one.
    """
    if not lead:
        return []
    digest = hashlib.sha256(b"kvstore-chunk-lead" + struct.pack(f"<{len(lead)}i", *lead)).digest()
    words = struct.unpack(f"<{_NUM_TAG_TOKENS}I", digest[: 4 * _NUM_TAG_TOKENS])
    return [-1 - (w & 0x7FFFFFFF) for w in words]


def stored_chunk_tokens(chunk: Sequence[int], lead: Sequence[int] = ()) -> list[int]:
    """The tokens :func:`build_cache` stores ``chunk`` under when computed after ``lead``
    (for ``client.lookup_chunk`` / ``delete_chunk``)."""
    return _lead_tag(list(lead)) + list(chunk)


def _chunk_kv(client: Any, encoder: _ChunkEncoder, chunk: list[int]) -> tuple[torch.Tensor, bool]:
    """(position-0 KV of ``chunk`` computed after the encoder's lead, in the model's dtype;
    whether it came from the store).

    Stored under the position-free key of ``tag + chunk`` (:func:`_lead_tag`), with zero
    rows for the tag: entries conditioned on different leads never mix.
    """
    model_dtype = next(encoder.model.parameters()).dtype
    tag = _lead_tag(encoder.lead)
    stored = client.get_chunk(tag + chunk)
    if stored is not None:
        return torch.as_tensor(stored)[:, :, :, len(tag) :].to(model_dtype), True
    kv = encoder.encode(chunk).to(TORCH_DTYPES[client.layout.dtype])
    if tag:
        kv = torch.cat((kv.new_zeros(client.layout.shape(len(tag))), kv), dim=3)
    client.put_chunk(tag + chunk, kv)
    # Use what the store holds (a lossy client codec changes it), so a hit and a miss
    # give the same cache; one more get per miss, next to the miss's forward pass.
    stored = client.get_chunk(tag + chunk)
    if stored is not None:
        kv = torch.as_tensor(stored)
    return kv[:, :, :, len(tag) :].to(model_dtype), False


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
    lead: list[int],
    naive: bool = False,
    room: int = 0,
    progress: bool = False,
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
    encoder = _ChunkEncoder(model, lead, spec)
    shown = progress and len(chunks) >= PROGRESS_MIN_PASSAGES
    for chunk in track(chunks, "RAG passages", enabled=shown):
        chunk_kv, hit = _chunk_kv(client, encoder, chunk)
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
    recompute_ratio: float | None = None,
    query_aware: bool = False,
    chunk_lead: Sequence[int] | torch.Tensor | None = None,
    min_speedup: float = DEFAULT_MIN_SPEEDUP,
    progress: bool = True,
) -> tuple[Any, torch.Tensor, RagStats]:
    """A ready cache for ``prefix + chunks + query`` built from stored chunk KV.

    Args:
        model: a Llama-style transformers causal LM (sdpa or eager attention).
        client: a connected ``kvstore.Client`` whose layout matches the model. Its
            ``codec`` is how missing chunks are stored: a kvq level ("high",
            "balanced") stores them compressed, and every chunk (hit or miss) is
            then used as the store returns it.
        chunks: retrieved passages, each a list of token ids (any length >= 1).
        query: the question's token ids (>= 1 token); prefilled on top.
        prefix: optional leading tokens (system prompt), reused by prefix chain.
        recompute_ratio: None (default): adaptive, the chunk tokens whose layer-1 KV
            deviates (the passages interact there), at least 5% and at most what
            ``min_speedup`` allows (kvstore.rag.budget). A float: exactly that share
            of chunk tokens, whatever it costs (``min_speedup`` does not apply).
        query_aware: give half of the recompute to stale tokens the query reads most
            (a short probe first, ~2.5% of a full prefill on SmolLM2; lowered the KL
            for chunks computed alone, raised it with the prefix as lead; see
            kvstore.rag.blend).
        chunk_lead: what a chunk missing from the store is computed after (its KV is
            conditioned on these tokens; only the chunk's rows are kept). None (default):
            the prefix, so stored chunks hit only under the same prefix; ``[]``: nothing,
            entries shared by every prefix. Entries of different leads never mix.
        progress: with 8 passages or more, draw a bar of the passages loaded or
            encoded on stderr when it is a terminal.
        min_speedup: the TTFT budget of the adaptive ratio: the least speedup over a
            full prefill of the prompt, as predicted by the blend's cost model when
            every chunk hits (``>= 1``; default 3.0). Misses cost a forward pass each.

    Returns:
        ``(cache, logits, stats)``: a DynamicCache of the whole prompt, the
        next-token logits after it (``[vocab]``, float32) and a :class:`RagStats`.

    Raises:
        InvalidArgument: bad inputs, a layout that does not fit the model, or a
            model whose RoPE or attention this module cannot handle.
    """
    spec = rope_spec(model)
    chunk_ids = [as_token_list(c) for c in chunks]
    query_ids = as_token_list(query)
    prefix_ids = [] if prefix is None else as_token_list(prefix)
    lead = prefix_ids if chunk_lead is None else as_token_list(chunk_lead)
    _check_inputs(model, client, chunk_ids, query_ids, recompute_ratio, lead)
    num_chunk_tokens = sum(len(c) for c in chunk_ids)
    num_tokens = len(prefix_ids) + num_chunk_tokens + len(query_ids)
    num_layers = model.config.num_hidden_layers
    ctx = _load_context(model, client, prefix_ids, chunk_ids, spec, lead, room=len(query_ids),
                        progress=progress)
    num_prefix = len(prefix_ids)
    num_fixed_rows = len(query_ids) + num_prefix - ctx.num_prefix_stored
    recompute = plan_recompute(
        num_tokens, num_chunk_tokens, num_fixed_rows, num_layers, recompute_ratio, min_speedup
    )
    candidates = torch.zeros(num_prefix + num_chunk_tokens, dtype=torch.bool)
    candidates[num_prefix:] = True
    forced = torch.zeros_like(candidates)
    forced[ctx.num_prefix_stored : num_prefix] = True
    ids = prefix_ids + [t for c in chunk_ids for t in c] + query_ids
    cache, logits, num_recomputed = blend(
        model, ids, ctx.kv, candidates, forced, recompute, query_aware
    )
    if num_prefix:
        store_new_chunks(client, prefix_ids, cache, ctx.num_prefix_stored)
    stats = RagStats(
        num_prefix_tokens=num_prefix,
        num_chunk_tokens=num_chunk_tokens,
        num_query_tokens=len(query_ids),
        num_reused=ctx.num_prefix_stored + num_chunk_tokens - num_recomputed,
        num_recomputed=num_recomputed,
        num_prefilled=num_fixed_rows,
        num_chunks_hit=ctx.num_chunks_hit,
        num_chunks_encoded=len(chunk_ids) - ctx.num_chunks_hit,
        recompute_ratio=num_recomputed / num_chunk_tokens,
        max_recompute_ratio=recompute.max_rows / num_chunk_tokens,
        predicted_speedup=cost_model().predicted_speedup(
            num_tokens, num_recomputed + num_fixed_rows, num_layers
        ),
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
    query_ids = as_token_list(query)
    prefix_ids = [] if prefix is None else as_token_list(prefix)
    _check_inputs(model, client, chunk_ids, query_ids, 0.0, [])
    ctx = _load_context(model, client, prefix_ids, chunk_ids, spec, [], naive=True)
    cache = cache_from_kv(model, ctx.kv)
    device = next(model.parameters()).device
    out = model(
        input_ids=torch.tensor([query_ids], device=device),
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    return cache, out.logits[0, -1].float()
