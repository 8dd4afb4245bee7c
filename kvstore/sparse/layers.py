"""Per-layer decode state: a dense layer (exact KV kept whole) or a sparse layer.

A sparse layer attends, per kv head, to: the sink blocks and outlier blocks (exact,
loaded once), the ``local_blocks`` most recent sealed blocks plus the unsealed
tail (exact, kept as produced), and the top-k selected blocks, whose values and
exact keys are gathered from the block store on a miss (or keys rebuilt from the
low-rank factors), RoPE re-applied. Every other sealed block enters as one
summary term (landmark key, mean value, weight ``block_tokens``) unless
``summarize_unselected`` is off. Every ``block_tokens`` generated tokens are
sealed into a new block, so the exact window never grows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvstore.kernels.sparse_diff import diff
from kvstore.kernels.sparse_rebuild import rebuild
from kvstore.models.rope import rotate
from kvstore.sparse.blocks import KIND_KEY, KIND_VALUE, BlockStore, Rope
from kvstore.sparse.config import SparseConfig
from kvstore.sparse.select import select_blocks
from kvstore.sparse.shadow import LayerShadow


@dataclass(slots=True)
class StepStats:
    """What one sparse layer did in one decode step."""

    selected: torch.Tensor  # [Hkv, k] block ids chosen this step
    num_hits: int  # selected blocks already resident
    num_misses: int  # selected blocks gathered from the store
    bytes_fetched: int  # bytes read from the store (values, plus exact keys if configured)
    num_attended: int  # tokens attended per kv head


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """GQA attention of one query ``[Hq, D]`` over ``keys/values [Hkv, n, D]`` -> ``[Hq, D]``.

    ``bias [Hkv, n]`` is added to the logits: -inf masks a slot, log(m) makes one key
    stand for m tokens with that key and value.
    """
    num_kv, _, dim = keys.shape
    qg = q.float().view(num_kv, -1, dim)
    logits = torch.einsum("hgd,hnd->hgn", qg, keys.float()) * scale
    if bias is not None:
        logits = logits + bias[:, None, :]
    probs = torch.softmax(logits, dim=-1)
    return torch.einsum("hgn,hnd->hgd", probs, values.float()).reshape(q.shape)


class DenseLayer:
    """Exact attention over every token: the first layers, and the dense baseline."""

    def __init__(self, k_post: torch.Tensor, values: torch.Tensor, scale: float) -> None:
        self.k, self.v, self.scale = k_post.float(), values.float(), scale  # [Hkv, n, D]

    def step(self, q: torch.Tensor, k_pre: torch.Tensor, k_post: torch.Tensor,
             v: torch.Tensor) -> tuple[torch.Tensor, StepStats | None]:
        self.k = torch.cat((self.k, k_post.float()[:, None]), dim=1)
        self.v = torch.cat((self.v, v.float()[:, None]), dim=1)
        return attend(q, self.k, self.v, self.scale), None


class SparseLayer:
    """Sparse attention state of one layer of one sequence (see module doc)."""

    def __init__(self, layer: int, cfg: SparseConfig, shadow: LayerShadow, store: BlockStore,
                 rope: Rope, scale: float, tail_pre: torch.Tensor, tail_v: torch.Tensor) -> None:
        """``tail_pre``/``tail_v`` ``[Hkv, n, D]``: unsealed prefix tokens (n < block_tokens)."""
        self.layer, self.cfg, self.shadow, self.store = layer, cfg, shadow, store
        self.rope, self.scale = rope, scale
        num_kv, dim, bt = shadow.landmarks.shape[0], shadow.landmarks.shape[2], cfg.block_tokens
        self.exact_keys = cfg.exact_keys
        # sink + outliers, exact and post-RoPE: [Hkv, n_static * T, D]
        sink = torch.arange(min(cfg.sink_blocks, shadow.num_blocks)).expand(num_kv, -1)
        self.static_blocks = torch.cat((sink, shadow.outliers), dim=1).contiguous()
        self.static_k, self.static_v = self._load_exact(self.static_blocks)
        # local window: exact sealed blocks then the tail, post-RoPE keys
        local = max(0, min(cfg.local_blocks, shadow.num_blocks - cfg.sink_blocks))
        self.local_start = shadow.num_blocks - local  # first block of the local window
        blocks = torch.arange(self.local_start, shadow.num_blocks).expand(num_kv, -1)
        win_k, win_v = self._load_exact(blocks.contiguous())
        first_tail = shadow.num_blocks * bt
        tail_k = rotate(tail_pre, torch.arange(first_tail, first_tail +
                                                              tail_pre.shape[1]), *rope)
        self.recent_k = torch.cat((win_k, tail_k), dim=1)
        self.recent_v = torch.cat((win_v, tail_v.float()), dim=1)
        self.tail_pre = tail_pre.float()
        # resident selected blocks: slot tables and buffers
        slots = cfg.num_selected_blocks
        self.block_slot = torch.full((num_kv, shadow.capacity_blocks), -1, dtype=torch.int64)
        self.slot_block = torch.full((num_kv, slots), -1, dtype=torch.int64)
        self.res_k = torch.zeros(num_kv, slots, bt, dim)
        self.res_v = torch.zeros(num_kv, slots, bt, dim)
        self.last_selected = torch.zeros(num_kv, 0, dtype=torch.int64)
        self.last_window = (0, 0)  # token positions of the exact window in the last step

    def _load_exact(self, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact post-RoPE keys and values of ``blocks [Hkv, n]`` -> two ``[Hkv, n*T, D]``."""
        num_kv, n = blocks.shape
        dim, bt = self.shadow.landmarks.shape[2], self.cfg.block_tokens
        k = torch.zeros(num_kv, n, bt, dim)
        v = torch.zeros(num_kv, n, bt, dim)
        slots = torch.arange(n).expand(num_kv, -1).contiguous()
        self.store.gather(self.layer, KIND_KEY, blocks, slots, k, self.rope)
        self.store.gather(self.layer, KIND_VALUE, blocks, slots, v)
        return k.view(num_kv, n * bt, dim), v.view(num_kv, n * bt, dim)

    def selectable(self) -> torch.Tensor:
        """``[Hkv, num_blocks]``: sealed blocks that are neither static nor in the window."""
        num_kv = self.static_blocks.shape[0]
        mask = torch.ones(num_kv, self.shadow.num_blocks, dtype=torch.bool)
        mask[:, self.local_start :] = False
        mask.scatter_(1, self.static_blocks, False)
        return mask

    def step(self, q: torch.Tensor, k_pre: torch.Tensor, k_post: torch.Tensor,
             v: torch.Tensor) -> tuple[torch.Tensor, StepStats]:
        """Attend for one new token (q ``[Hq, D]``, k/v ``[Hkv, D]``) and seal if a block fills."""
        self.recent_k = torch.cat((self.recent_k, k_post.float()[:, None]), dim=1)
        self.recent_v = torch.cat((self.recent_v, v.float()[:, None]), dim=1)
        self.tail_pre = torch.cat((self.tail_pre, k_pre.float()[:, None]), dim=1)
        cfg = self.cfg
        selected = select_blocks(cfg.selector, q, self.shadow, self.selectable(),
                                 cfg.num_selected_blocks, self.scale, self.rope,
                                 cfg.candidate_factor)
        miss_slot = diff(selected, self.block_slot, self.slot_block)
        fetched = self.store.gather(self.layer, KIND_VALUE, selected, miss_slot, self.res_v)
        if self.exact_keys:
            fetched += self.store.gather(self.layer, KIND_KEY, selected, miss_slot, self.res_k,
                                         self.rope)
        else:
            rebuild(self.shadow.coeffs, self.shadow.basis, selected, miss_slot, self.res_k,
                    self.rope)
        out, attended = self._attend(q, selected)
        num_misses = int((miss_slot >= 0).sum())
        stats = StepStats(selected, selected.numel() - num_misses, num_misses, fetched, attended)
        self.last_selected = selected
        if self.tail_pre.shape[1] == cfg.block_tokens:
            self._seal()
        return out, stats

    def _attend(self, q: torch.Tensor, selected: torch.Tensor) -> tuple[torch.Tensor, int]:
        num_kv, num_slots, bt, dim = self.res_k.shape
        live = torch.zeros(num_kv, num_slots, dtype=torch.bool)
        live.scatter_(1, self.block_slot.gather(1, selected), True)
        live = live[:, :, None].expand(-1, -1, bt).reshape(num_kv, num_slots * bt)
        keys = [self.static_k, self.res_k.view(num_kv, -1, dim), self.recent_k]
        values = [self.static_v, self.res_v.view(num_kv, -1, dim), self.recent_v]
        bias = [torch.zeros(num_kv, self.static_k.shape[1]),
                torch.zeros(num_kv, num_slots * bt).masked_fill(~live, float("-inf")),
                torch.zeros(num_kv, self.recent_k.shape[1])]
        if self.cfg.summarize_unselected:
            keys.append(self.shadow.landmarks[:, : self.shadow.num_blocks])
            values.append(self.shadow.value_means[:, : self.shadow.num_blocks])
            bias.append(self._summary_bias(selected))
        attended = self.static_k.shape[1] + selected.shape[1] * bt + self.recent_k.shape[1]
        first = self.local_start * bt
        self.last_window = (first, first + self.recent_k.shape[1])
        out = attend(q, torch.cat(keys, 1), torch.cat(values, 1), self.scale, torch.cat(bias, 1))
        return out, attended

    def _summary_bias(self, selected: torch.Tensor) -> torch.Tensor:
        """``[Hkv, num_blocks]``: log(T) for blocks attended by summary, -inf for the rest.

        A block neither attended exactly nor selected counts as ``block_tokens`` tokens
        with its landmark as key and its mean value as value.
        """
        rest = self.selectable().scatter(1, selected, False)
        bias = torch.full(rest.shape, math.log(self.cfg.block_tokens))
        return bias.masked_fill(~rest, float("-inf"))

    def _seal(self) -> None:
        """Turn the full tail into block ``num_blocks``: store it, extend the shadow."""
        bt, block = self.cfg.block_tokens, self.shadow.num_blocks
        v_new = self.recent_v[:, -bt:]
        self.store.write(self.layer, KIND_KEY, block, self.tail_pre[:, None])
        self.store.write(self.layer, KIND_VALUE, block, v_new[:, None])
        self.shadow.append_block(self.tail_pre, self.recent_k[:, -bt:], v_new)
        if self.shadow.capacity_blocks > self.block_slot.shape[1]:
            grown = torch.full((self.block_slot.shape[0], self.shadow.capacity_blocks), -1,
                               dtype=torch.int64)
            grown[:, : self.block_slot.shape[1]] = self.block_slot
            self.block_slot = grown
        self.tail_pre = self.tail_pre[:, :0]
        local = self.shadow.num_blocks - self.local_start
        if local > self.cfg.local_blocks:  # the oldest window block becomes selectable
            self.local_start += 1
            self.recent_k, self.recent_v = self.recent_k[:, bt:], self.recent_v[:, bt:]

    def attended_positions(self) -> torch.Tensor:
        """``[Hkv, n]`` token positions attended in the last step (for measurements)."""
        bt = self.cfg.block_tokens
        offs = torch.arange(bt)
        static = (self.static_blocks[:, :, None] * bt + offs).flatten(1)
        chosen = (self.last_selected[:, :, None] * bt + offs).flatten(1)
        window = torch.arange(*self.last_window).expand(static.shape[0], -1)
        return torch.cat((static, chosen, window), dim=1)
