"""``generate``: greedy generation with sparse decode for HF Llama-style models."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from kvstore.errors import InvalidArgument
from kvstore.sparse.blocks import BlockGeometry, HostBlockPool, SplitBlockSource
from kvstore.sparse.config import SparseConfig
from kvstore.sparse.decoder import SparseDecoder, build_sequence
from kvstore.sparse.llama import capture_prefill, fingerprint_of, geometry_of, rope_of
from kvstore.sparse.shadow import ShadowBundle
from kvstore.sparse.store import HostSequenceStore, SequenceStore, sequence_key

log = logging.getLogger(__name__)


def _token_list(input_ids: Any) -> list[int]:
    ids = input_ids.tolist() if isinstance(input_ids, torch.Tensor) else list(input_ids)
    if ids and isinstance(ids[0], list):
        if len(ids) != 1:
            raise InvalidArgument(f"generate takes one sequence, got a batch of {len(ids)}")
        ids = ids[0]
    if len(ids) < 2:
        raise InvalidArgument(f"generate needs a prompt of at least 2 tokens, got {len(ids)}")
    return [int(t) for t in ids]


def open_decoder(model: Any, prefix: Sequence[int], cfg: SparseConfig, client: SequenceStore,
                 max_new_tokens: int) -> tuple[SparseDecoder, bool]:
    """A decoder positioned after ``prefix``: reloaded from ``client`` or prefilled into it.

    Returns (decoder, whether the stored bundle was reused).
    """
    fingerprint = fingerprint_of(model)
    key = sequence_key(fingerprint, cfg, list(prefix))
    geo = geometry_of(model)
    geometry = BlockGeometry(geo.num_layers, geo.num_kv_heads, geo.head_dim, cfg.block_tokens,
                             cfg.store_dtype)
    extra_blocks = max_new_tokens // cfg.block_tokens + 2
    stored = client.lookup(key)
    if stored is not None:
        bundle = ShadowBundle.from_bytes(stored.bundle, len(prefix) // cfg.block_tokens
                                         + extra_blocks)
        if bundle.fingerprint != fingerprint:
            raise InvalidArgument(f"stored shadow bundle is for model {bundle.fingerprint}, "
                                  f"this model is {fingerprint}")
        prefix_blocks, reused = stored.blocks, True
    else:
        k_pre, values = capture_prefill(model, torch.tensor(list(prefix)))
        prefix_blocks = client.create(key, geometry, len(prefix) // cfg.block_tokens + 1)
        bundle = build_sequence(k_pre, values, cfg, rope_of(model), fingerprint, prefix_blocks,
                                len(prefix) // cfg.block_tokens + extra_blocks)
        client.save_bundle(key, bundle.to_bytes())
        reused = False
    tail = HostBlockPool(geometry, extra_blocks, first_block=bundle.num_blocks)
    store = SplitBlockSource(prefix_blocks, bundle.num_blocks, tail)
    return SparseDecoder(model, cfg, bundle, store), reused


@torch.no_grad()
def generate(model: Any, input_ids: Any, client: SequenceStore | None = None,
             budget_tokens: int = 512, max_new_tokens: int = 32,
             eos_token_id: int | None = None, **options: Any) -> list[int]:
    """Greedy generation with sparse decode; returns the generated token ids.

    The prompt minus its last token is prefilled (or, if ``client`` holds it, its
    blocks and shadow bundle are reloaded); the last prompt token is the first
    decode step, so a resumed and a fresh prompt decode identically.

    Args:
        model: a transformers Llama-style causal LM (SmolLM2 on CPU works).
        input_ids: prompt token ids, a list or a ``[n]``/``[1, n]`` tensor.
        client: where blocks and bundles live; a fresh in-process store if None.
        budget_tokens: tokens attended per sparse layer (see :class:`SparseConfig`).
        max_new_tokens: tokens to generate at most.
        eos_token_id: stop after generating this token.
        **options: other :class:`SparseConfig` fields (selector, rank, dense_layers, ...).

    Raises:
        InvalidArgument: an unsupported model, a bad option, or an empty prompt.
    """
    cfg = SparseConfig(budget_tokens=budget_tokens, **options)
    ids = _token_list(input_ids)
    store = client if client is not None else HostSequenceStore()  # an empty store is falsy
    decoder, reused = open_decoder(model, ids[:-1], cfg, store,
                                   max_new_tokens)
    log.info("sparse generate: %d prompt tokens, bundle %s", len(ids),
             "reused" if reused else "built")
    out: list[int] = []
    token = ids[-1]
    for _ in range(max_new_tokens):
        logits, _ = decoder.step(token)
        token = int(logits.argmax())
        out.append(token)
        if token == eos_token_id:
            break
    return out
