"""CacheBlend-style selective recompute of reused KV, layer by layer with the model's own layers.

Given a context whose KV was reused (chunks computed apart, keys moved to their
real positions) and the query that follows it, this fixes the cross-chunk
attention the reused KV lacks and prefills the query in the same pass:

1. **Layer 0, every token.** Layer-0 KV depends only on each token and its
   position, so it is recomputed for the whole prompt (cheap: 1 of L layers) and
   gives every token's input to layer 1.
2. **Selection at layer 1.** Layer-1 K and V of every candidate are computed
   from the layer-0 outputs (norm + projections + RoPE only, no attention or MLP)
   and compared with the reused layer-1 KV (squared error, K and V each
   normalised by their mean square), as in CacheBlend: the tokens that deviate
   most are recomputed, the rest keep their reused KV. How many is a
   :class:`~kvstore.rag.budget.Recompute`: a fixed count, or (adaptive) those whose
   deviation exceeds a threshold, clipped to a floor and to the TTFT budget.
3. **Query-aware selection** (``query_aware=True``). First a probe: the forced
   rows (below) and the query run through the first third of the layers against
   the reused KV, accumulating the query rows' attention over the context
   (softmax over the context keys, mean over heads, rows and layers): how much
   the query reads each token. Half of ``num_select`` then goes by deviation as
   above, half by deviation x reads: stale tokens the query actually reads.
   Measured on SmolLM2 (4 x 256 chunks, ratio 0.15, mean KL to a full prefill
   over 32 answer tokens): deviation alone 0.0287 on the bench prompts and
   0.0167 on held-out ones (other passages, offsets and question); query-aware
   with reads from layers 1-8 0.0266 and 0.0126, layers 1-15 0.0265 and 0.0121,
   every layer 0.0245 and 0.0104. An oracle ranking by the true deviation from a
   full prefill summed over all layers gave only 0.0277 on the bench prompts:
   which tokens the query reads matters more than how stale they are. Weighting
   the whole budget by reads, or reads of layers 1-4 or layer 1 alone, did worse.
   Off by default: the probe is one more pass over a third of the weights (few
   rows, but on CPU such passes are bound by reading the weights), ~0.08 s of
   CPU or ~2.5% of a full prefill, while top-1 agreement moved within noise.
   (Figures above: chunks computed alone. With chunks computed after the prefix,
   kvstore.rag.build's default, it does worse: ratio 0.15, mean KL 0.0213 vs 0.0159.)
4. **Layers 1..L-1, selected tokens + forced tokens + query only.** Each decoder
   layer of the model runs on the rows of the selected tokens, the context tokens
   that have no stored KV at all (a prefix tail: "forced", exact) and the query
   tokens. A cache stand-in *scatters* their fresh K/V into the layer's full KV
   at their own positions (replacing the stale reused entries) and hands the
   full KV to the attention, with an additive mask ``key position <= query
   position``. Each row therefore attends to exactly what it would in a full
   prefill, except that unselected tokens contribute their reused KV.

Why not one masked forward of the whole model on the selected tokens: a
transformers cache *appends* the KV of the tokens it is given, so the stale
reused entries of those tokens stay visible, the fresh ones land after the
context (out of causal order), and a full-model forward cannot start at layer 1
from inputs computed for the selection. The per-layer loop uses the model's own
decoder layers (weights, norms, attention implementation), so nothing of the
architecture is re-implemented except the K/V and query projections used for
ranking (the probe's reads are tested against the model's own attention weights).
With every context token selected the loop is an exact full prefill (tested).
"""

from __future__ import annotations

from typing import Any

import torch

from kvstore.models.cache import cache_from_kv
from kvstore.models.llama import layer_kv, layer_queries
from kvstore.rag.budget import Recompute


class _ScatterCache:
    """Cache stand-in: writes the rows' fresh K/V at their positions and returns the full KV."""

    def __init__(self, kv: torch.Tensor) -> None:
        self.full = kv  # [layers, 2, heads, tokens, dim], model dtype; updated in place
        self.rows = torch.arange(kv.shape[3])  # positions of the rows being computed

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.full[layer_idx, 0][None], self.full[layer_idx, 1][None]
        keys[:, :, self.rows] = key_states
        values[:, :, self.rows] = value_states
        return keys, values


def _causal_mask(rows: torch.Tensor, num_tokens: int, dtype: torch.dtype) -> torch.Tensor:
    # [1, 1, rows, tokens]: 0 where key position <= the row's position, else -inf-ish.
    allowed = torch.arange(num_tokens)[None, :] <= rows[:, None]
    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def _context_reads(queries: torch.Tensor, keys: torch.Tensor, scaling: float) -> torch.Tensor:
    """Mean attention ``[ctx]`` of ``queries`` over the context ``keys`` [1, kv_heads, ctx, dim].

    Softmax over the context keys only (the query's own tokens are never candidates),
    averaged over heads and query rows.
    """
    groups = queries.shape[1] // keys.shape[1]  # grouped-query attention: kv head h // groups
    scores = queries @ keys.repeat_interleave(groups, dim=1).transpose(-1, -2) * scaling
    return scores.float().softmax(dim=-1).mean(dim=(0, 1, 2)).cpu()


def _deviation(fresh: tuple[torch.Tensor, ...], reused: torch.Tensor) -> torch.Tensor:
    """Per-token squared deviation ``[tokens]``; K and V each scaled by their mean square."""
    total = torch.zeros(reused.shape[-2])
    for i in (0, 1):
        new, old = fresh[i][0].float(), reused[i].float()  # [heads, tokens, dim]
        err = (new - old).pow(2).sum(dim=(0, 2)).cpu()
        total += err / old.pow(2).sum(dim=(0, 2)).mean().clamp_min(1e-12).cpu()
    return total


def _run_rows(
    model: Any,
    hidden: torch.Tensor,
    rows: torch.Tensor,
    cos_sin: tuple[torch.Tensor, torch.Tensor],
    cache: _ScatterCache,
    num_ctx: int | None = None,
    num_layers: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Decoder layers 1..num_layers-1 (default: all) on the tokens at positions ``rows``.

    ``hidden`` is their layer-1 input. With ``num_ctx``, also returns the mean over
    those layers of the query rows' (positions ``>= num_ctx``) attention over the
    context, see :func:`_context_reads`.
    """
    device = hidden.device
    cos, sin = (t[:, rows] for t in cos_sin)
    mask = _causal_mask(rows, cache.full.shape[3], hidden.dtype).to(device)
    position_ids = rows[None].to(device)
    cache.rows = rows
    query = (rows >= num_ctx).nonzero().flatten() if num_ctx is not None else None
    reads = None if query is None else torch.zeros(num_ctx)
    layers = model.model.layers[1 : num_layers or model.config.num_hidden_layers]
    for index, layer in enumerate(layers, start=1):
        if query is not None:
            q = layer_queries(layer, hidden[:, query], cos[:, query], sin[:, query])
        hidden = layer(
            hidden,
            attention_mask=mask,
            position_embeddings=(cos, sin),
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
        )
        if query is not None:
            keys = cache.full[index, 0][None, :, :num_ctx]  # as this layer's attention saw them
            reads += _context_reads(q, keys, layer.self_attn.scaling)
    return hidden, None if reads is None else reads / len(layers)


def _select(
    model: Any,
    hidden: torch.Tensor,
    cache_kv: torch.Tensor,
    idx: torch.Tensor,
    recompute: Recompute,
    cos_sin: tuple[torch.Tensor, torch.Tensor],
    reads: torch.Tensor | None,
) -> torch.Tensor:
    """Positions (sorted) of the candidates ``idx`` to recompute.

    Those whose layer-1 KV deviates most, as many as ``recompute`` counts; with
    ``reads`` (the query's attention to each context token) only half of them, the
    other half those with the most deviation x reads.
    """
    cos, sin = (t[:, idx] for t in cos_sin)
    fresh = layer_kv(model.model.layers[1], hidden[:, idx], cos, sin)
    dev = _deviation(fresh, cache_kv[1][:, :, idx])
    num_deviating = 0 if recompute.threshold is None else int((dev > recompute.threshold).sum())
    num_select = min(recompute.count(num_deviating), idx.numel())
    if num_select in (0, idx.numel()):
        return idx[:num_select]
    num_dev = num_select if reads is None else num_select - num_select // 2
    by_dev = dev.topk(num_dev).indices
    if reads is None:
        return idx[by_dev].sort().values
    weighted = dev * reads[idx]
    weighted[by_dev] = -1.0  # already taken
    by_reads = weighted.topk(num_select - num_dev).indices
    return idx[torch.cat((by_dev, by_reads))].sort().values


@torch.inference_mode()
def blend(
    model: Any,
    ids: list[int],
    kv: torch.Tensor,
    candidates: torch.Tensor,
    forced: torch.Tensor,
    recompute: Recompute,
    query_aware: bool = False,
) -> tuple[Any, torch.Tensor, int]:
    """Selective recompute of reused context KV, with the query prefilled on top.

    Args:
        model: a Llama-style causal LM (checked by the caller).
        ids: token ids of context + query.
        kv: ``[layers, 2, heads, len(ids), dim]`` in the model's dtype: the reused KV of
            the ``ctx`` context tokens (keys at their real positions), then zeros for the
            query. Used as the cache's storage: overwritten in place.
        candidates: ``[ctx]`` bool, tokens that may be recomputed (others are exact or forced).
        forced: ``[ctx]`` bool, context tokens without stored KV: computed like the query
            (their ``kv`` entries are zero placeholders, overwritten before any use).
        recompute: how many candidates to recompute on layers 1..L-1.
        query_aware: probe what the query reads and give it half of the selection.

    Returns:
        ``(cache, logits, num_recomputed)``: a DynamicCache of all ``len(ids)`` tokens,
        the next-token logits ``[vocab]`` (float32) and the number of recomputed candidates.
    """
    inner = model.model
    device = next(model.parameters()).device
    num_tokens, num_ctx = len(ids), candidates.numel()
    assert num_ctx < num_tokens == kv.shape[3] and forced.numel() == num_ctx
    positions = torch.arange(num_tokens)
    hidden = inner.embed_tokens(torch.tensor([ids], device=device))
    cos_sin = inner.rotary_emb(hidden, position_ids=positions[None].to(device))
    cache = _ScatterCache(kv)
    # Every row at layer 0: sdpa's causal kernel needs no mask (a float mask costs ~1.7x).
    is_sdpa = model.config._attn_implementation == "sdpa"
    mask = None if is_sdpa else _causal_mask(positions, num_tokens, hidden.dtype).to(device)
    hidden = inner.layers[0](
        hidden,
        attention_mask=mask,
        position_embeddings=cos_sin,
        position_ids=positions[None].to(device),
        cache=cache,
        use_cache=True,
    )
    idx = candidates.nonzero().flatten()
    query = torch.arange(num_ctx, num_tokens)
    forced_rows = forced.nonzero().flatten()
    fixed = recompute.threshold is None
    if not fixed or 0 < recompute.max_rows < idx.numel():
        reads = None
        if query_aware:
            # Probe against the reused KV (it writes only forced and query rows, which
            # the pass below computes again on every layer).
            probe = torch.cat((forced_rows, query))
            num_layers = max(2, model.config.num_hidden_layers // 3 + 1)  # layers 1..L/3
            _, reads = _run_rows(
                model, hidden[:, probe], probe, cos_sin, cache, num_ctx, num_layers
            )
        selected = _select(model, hidden, kv, idx, recompute, cos_sin, reads)
    else:
        selected = idx[: max(recompute.max_rows, 0)]
    rows = torch.cat((torch.cat((selected, forced_rows)).sort().values, query))
    hidden, _ = _run_rows(model, hidden[:, rows], rows, cos_sin, cache)
    logits = model.lm_head(inner.norm(hidden[:, -1:]))[0, -1].float()
    return cache_from_kv(model, cache.full), logits, int(selected.numel())
