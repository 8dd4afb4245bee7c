"""Chunk selection for one sparse layer and decode step: landmark, low-rank or two-stage.

All three rank blocks per kv head by the max over its GQA group of a score with
the true ``1/sqrt(head_dim)`` scale. Landmark scores are ``q . landmark``; low-rank
scores are the log-sum-exp of ``q . k`` over the block's keys rebuilt from the
factors with RoPE re-applied (an estimate of log attention mass). Two-stage lets
landmarks pick ``candidate_factor * k`` candidates and rescores only those.
"""

from __future__ import annotations

import torch

from kvstore.kernels.sparse_rebuild import rebuild
from kvstore.kernels.sparse_score import block_scores
from kvstore.sparse.blocks import Rope
from kvstore.sparse.shadow import LayerShadow


def landmark_scores(q: torch.Tensor, shadow: LayerShadow, scale: float) -> torch.Tensor:
    """``[Hkv, num_blocks]`` scores of every sealed block from its landmark."""
    landmarks = shadow.landmarks[:, : shadow.num_blocks, None, :]  # [Hkv, NB, 1, D]
    return block_scores(q, landmarks.contiguous(), scale)


def lowrank_scores(q: torch.Tensor, shadow: LayerShadow, candidates: torch.Tensor,
                   scale: float, rope: Rope) -> torch.Tensor:
    """``[Hkv, C]`` scores of ``candidates [Hkv, C]`` from their rebuilt post-RoPE keys."""
    num_kv, num_cand = candidates.shape
    dim = shadow.landmarks.shape[2]
    keys = torch.empty(num_kv, num_cand, shadow.block_tokens, dim, device=q.device)
    slots = torch.arange(num_cand, device=q.device).expand(num_kv, -1).contiguous()
    rebuild(shadow.coeffs, shadow.basis, candidates, slots, keys, rope)
    return block_scores(q, keys, scale)


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    return scores.topk(min(k, scores.shape[1]), dim=1).indices


def select_blocks(selector: str, q: torch.Tensor, shadow: LayerShadow, selectable: torch.Tensor,
                  k: int, scale: float, rope: Rope, candidate_factor: int = 8) -> torch.Tensor:
    """Top-``k`` selectable blocks per kv head, ``[Hkv, k']`` int64 with k' = min(k, selectable).

    Args:
        selector: "landmark", "lowrank" or "two_stage".
        q: post-RoPE query ``[Hq, D]``.
        selectable: ``[Hkv, num_blocks]`` bool; False for sink, outliers, local window.
        k: blocks to select.
    """
    num_selectable = int(selectable.sum(dim=1).min())
    k = min(k, num_selectable)
    if k == 0:
        return torch.zeros(selectable.shape[0], 0, dtype=torch.int64, device=q.device)
    if selector == "lowrank":
        ids = _top(selectable.to(torch.int8), num_selectable)  # selectable ids first
        scores = lowrank_scores(q, shadow, ids, scale, rope)
        return ids.gather(1, _top(scores, k))
    scores = landmark_scores(q, shadow, scale).masked_fill(~selectable, float("-inf"))
    if selector == "landmark":
        return _top(scores, k)
    # never more candidates than selectable blocks: the masked ones score -inf
    candidates = _top(scores, min(k * candidate_factor, num_selectable))
    rescored = lowrank_scores(q, shadow, candidates, scale, rope)
    return candidates.gather(1, _top(rescored, k))
