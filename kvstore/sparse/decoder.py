"""SparseDecoder: builds a sequence's shadows at prefill (or reloads them) and decodes.

``build_sequence`` turns captured pre-RoPE keys and values into stored blocks plus
a :class:`ShadowBundle`; ``SparseDecoder`` turns a bundle plus a block store into
per-layer states and runs decode steps. Prefill and resume meet at the bundle, so
the resumed path is the one every generation takes.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from kvstore.errors import InvalidArgument
from kvstore.models.arch import geometry_of
from kvstore.models.llama import decode_token
from kvstore.models.rope import rotate
from kvstore.sparse.blocks import KIND_KEY, KIND_VALUE, BlockStore, Rope
from kvstore.sparse.config import SparseConfig
from kvstore.sparse.layers import DenseLayer, SparseLayer
from kvstore.sparse.shadow import ShadowBundle, build_layer_shadow

log = logging.getLogger(__name__)


def is_dense_layer(cfg: SparseConfig, layer: int) -> bool:
    return cfg.selector == "dense" or layer < cfg.dense_layers


def build_sequence(k_pre: torch.Tensor, values: torch.Tensor, cfg: SparseConfig, rope: Rope,
                   fingerprint: str, store: BlockStore, capacity_blocks: int = 0) -> ShadowBundle:
    """Write whole blocks of ``k_pre``/``values [L, Hkv, n, D]`` to ``store``; build shadows."""
    num_layers, num_kv, n, dim = k_pre.shape
    bt = cfg.block_tokens
    num_blocks = n // bt
    sealed = num_blocks * bt
    capacity = max(capacity_blocks, num_blocks + 1)
    layers = {}
    for layer in range(num_layers):
        for kind, data in ((KIND_KEY, k_pre[layer]), (KIND_VALUE, values[layer])):
            store.write(layer, kind, 0, data[:, :sealed].reshape(num_kv, num_blocks, bt, dim))
        if not is_dense_layer(cfg, layer):
            rank = cfg.rank_for(num_kv * dim)
            layers[layer] = build_layer_shadow(
                k_pre[layer, :, :sealed], values[layer, :, :sealed], rank, bt, cfg.outlier_blocks,
                (cfg.sink_blocks, cfg.local_blocks), rope, capacity)
    return ShadowBundle(fingerprint, n, bt, rope[0], rope[1], layers,
                        k_pre[:, :, sealed:].clone(), values[:, :, sealed:].clone())


class SparseDecoder:
    """Greedy-decode state of one sequence over a model, a bundle and a block store."""

    def __init__(self, model: Any, cfg: SparseConfig, bundle: ShadowBundle,
                 store: BlockStore) -> None:
        self.model, self.cfg, self.bundle, self.store = model, cfg, bundle, store
        self.geometry = geometry_of(model)
        self.rope: Rope = (bundle.rope_inv_freq, bundle.rope_scaling)
        self.position = bundle.num_tokens  # position of the next token fed
        self.layers: list[Any] = [self._layer_state(i) for i in range(self.geometry.num_layers)]

    def _layer_state(self, layer: int) -> DenseLayer | SparseLayer:
        b, scale = self.bundle, self.geometry.scale
        tail_pre, tail_v = b.tail_k_pre[layer], b.tail_v[layer]
        if is_dense_layer(self.cfg, layer):
            k, v = self._read_all(layer)
            first = b.num_blocks * b.block_tokens
            positions = torch.arange(first, first + tail_pre.shape[1])
            tail_k = rotate(tail_pre, positions, *self.rope)
            return DenseLayer(torch.cat((k, tail_k), 1), torch.cat((v, tail_v.float()), 1), scale)
        if layer not in b.layers:
            raise InvalidArgument(f"shadow bundle has no shadow for sparse layer {layer}; "
                                  f"it was built with another dense_layers/selector")
        return SparseLayer(layer, self.cfg, b.layers[layer], self.store, self.rope, scale,
                           tail_pre, tail_v)

    def _read_all(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact post-RoPE keys and values of every sealed prefix block ``[Hkv, n, D]``."""
        g, nb = self.geometry, self.bundle.num_blocks
        bt = self.bundle.block_tokens
        blocks = torch.arange(nb).expand(g.num_kv_heads, -1).contiguous()
        k = torch.zeros(g.num_kv_heads, nb, bt, g.head_dim)
        v = torch.zeros_like(k)
        self.store.gather(layer, KIND_KEY, blocks, blocks, k, self.rope)
        self.store.gather(layer, KIND_VALUE, blocks, blocks, v)
        return k.view(g.num_kv_heads, -1, g.head_dim), v.view(g.num_kv_heads, -1, g.head_dim)

    def step(self, token: int) -> tuple[torch.Tensor, list[Any]]:
        """Feed ``token`` at the next position; returns (next-token logits, per-layer stats)."""
        logits, stats = decode_token(self.model, self.layers, token, self.position, self.rope)
        self.position += 1
        return logits, stats
