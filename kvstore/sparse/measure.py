"""Quality measurements of sparse decode against exact attention (bench and tests).

:class:`ObservedLayer` wraps a layer state; on every step it recomputes exact
attention of the same query over the layer's full exact KV (the oracle) and
records attention-mass recall, oracle top-k overlap and output relative error.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvstore.sparse.layers import SparseLayer, StepStats, attend


@dataclass(slots=True)
class LayerRecord:
    """One (layer, step) measurement."""

    recall: float  # attention mass (exact probabilities) on the attended tokens, mean over heads
    overlap: float  # |selected & oracle top-k blocks| / k, mean over kv heads
    rel_error: float  # ||o_sparse - o_exact|| / ||o_exact|| over all heads


@dataclass(slots=True)
class ObservedLayer:
    """A sparse layer plus the exact KV of the same layer, compared every step."""

    inner: SparseLayer
    keys: torch.Tensor  # [Hkv, n, D] exact post-RoPE keys of every token so far
    values: torch.Tensor  # [Hkv, n, D]
    records: list[LayerRecord] = field(default_factory=list)

    def step(self, q: torch.Tensor, k_pre: torch.Tensor, k_post: torch.Tensor,
             v: torch.Tensor) -> tuple[torch.Tensor, StepStats]:
        self.keys = torch.cat((self.keys, k_post.float()[:, None]), dim=1)
        self.values = torch.cat((self.values, v.float()[:, None]), dim=1)
        selectable = self.inner.selectable()  # before the step seals a block
        out, stats = self.inner.step(q, k_pre, k_post, v)
        self.records.append(self._measure(q, out, stats, selectable))
        return out, stats

    def _measure(self, q: torch.Tensor, out: torch.Tensor, stats: StepStats,
                 selectable: torch.Tensor) -> LayerRecord:
        scale, bt = self.inner.scale, self.inner.cfg.block_tokens
        num_kv, n, dim = self.keys.shape
        qg = q.float().view(num_kv, -1, dim)
        probs = torch.softmax(torch.einsum("hgd,hnd->hgn", qg, self.keys) * scale, dim=-1)
        exact = attend(q, self.keys, self.values, scale)
        attended = self.inner.attended_positions()  # [Hkv, m]
        mask = torch.zeros(num_kv, n, dtype=torch.bool).scatter_(1, attended, True)
        recall = float((probs * mask[:, None]).sum(-1).mean())
        nb = selectable.shape[1]
        mass = probs[:, :, : nb * bt].sum(1).view(num_kv, nb, bt).sum(-1)
        k = stats.selected.shape[1]
        overlap = 1.0
        if k:
            oracle = mass.masked_fill(~selectable, -1.0).topk(k, dim=1).indices
            hits = (stats.selected[:, :, None] == oracle[:, None, :]).any(-1).float()
            overlap = float(hits.mean())
        rel = float((out.float() - exact).norm() / exact.norm().clamp_min(1e-12))
        return LayerRecord(recall, overlap, rel)


def kl_and_agreement(dense_logits: torch.Tensor, sparse_logits: torch.Tensor
                     ) -> tuple[float, bool]:
    """KL(dense || sparse) of next-token distributions, and whether the argmaxes agree."""
    p = torch.log_softmax(dense_logits.float(), -1)
    q = torch.log_softmax(sparse_logits.float(), -1)
    kl = float((p.exp() * (p - q)).sum())
    return kl, bool(dense_logits.argmax() == sparse_logits.argmax())
