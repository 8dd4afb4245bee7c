"""``generate``: greedy generation with sparse decode for HF Llama-style models."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from safetensors import SafetensorError

from kvstore._progress import track
from kvstore.errors import Corrupt, InvalidArgument
from kvstore.models.arch import fingerprint_of, geometry_of
from kvstore.models.llama import capture_prefill
from kvstore.models.rope import rope_spec
from kvstore.sparse.blocks import BlockGeometry, HostBlockPool, Rope, SplitBlockSource
from kvstore.sparse.config import SparseConfig
from kvstore.sparse.decoder import SparseDecoder, build_sequence, is_dense_layer
from kvstore.sparse.shadow import ShadowBundle
from kvstore.sparse.store import HostSequenceStore, SequenceStore, sequence_kind

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


def _mismatch(bundle: ShadowBundle, cfg: SparseConfig, geometry: BlockGeometry, rope: Rope,
              fingerprint: str, num_tokens: int) -> str | None:
    """Why a stored bundle cannot serve this model, config and prefix; None if it can."""
    g, bt = geometry, cfg.block_tokens
    if bundle.fingerprint != fingerprint:
        return f"it is for model {bundle.fingerprint}, this model is {fingerprint}"
    if (bundle.num_tokens, bundle.block_tokens) != (num_tokens, bt):
        return (f"it covers {bundle.num_tokens} tokens in blocks of {bundle.block_tokens}, "
                f"the prefix has {num_tokens} in blocks of {bt}")
    if not torch.equal(bundle.rope_inv_freq, rope[0]) or bundle.rope_scaling != rope[1]:
        return "its RoPE frequencies differ from the model's"
    tail = (g.num_layers, g.num_kv_heads, num_tokens % bt, g.head_dim)
    if tuple(bundle.tail_k_pre.shape) != tail or tuple(bundle.tail_v.shape) != tail:
        return f"its tail is {tuple(bundle.tail_k_pre.shape)}, expected {tail}"
    sparse = {i for i in range(g.num_layers) if not is_dense_layer(cfg, i)}
    if set(bundle.layers) != sparse:
        return f"it shadows layers {sorted(bundle.layers)}, the config wants {sorted(sparse)}"
    width = g.num_kv_heads * g.head_dim
    for i, sh in bundle.layers.items():
        shapes = (tuple(sh.basis.shape), sh.landmarks.shape[0], sh.landmarks.shape[2],
                  sh.num_blocks, sh.outliers.shape[0])
        want = ((cfg.rank_for(width), width), g.num_kv_heads, g.head_dim, num_tokens // bt,
                g.num_kv_heads)
        if shapes != want or bool((sh.outliers >= sh.num_blocks).any()):
            return f"layer {i} has shadow shapes {shapes}, expected {want}"
    return None


def _load_bundle(data: bytes, capacity_blocks: int, *expected: Any) -> ShadowBundle | None:
    """A stored bundle that parses, verifies and matches ``expected``; None otherwise."""
    try:
        bundle = ShadowBundle.from_bytes(data, capacity_blocks)
    except (Corrupt, SafetensorError, KeyError, TypeError, ValueError) as exc:
        log.warning("ignoring a stored shadow bundle that does not load: %s", exc)
        return None
    reason = _mismatch(bundle, *expected)
    if reason is not None:
        log.warning("ignoring a stored shadow bundle: %s", reason)
        return None
    return bundle


def open_decoder(model: Any, prefix: Sequence[int], cfg: SparseConfig, client: SequenceStore,
                 max_new_tokens: int) -> tuple[SparseDecoder, bool]:
    """A decoder positioned after ``prefix``: reloaded from ``client`` or prefilled into it.

    A stored bundle that is corrupt or does not match the model, the config or the
    prefix is ignored (logged) and recomputed, and the recomputed one is saved.

    Returns (decoder, whether the stored bundle was reused).
    """
    spec = rope_spec(model)
    fingerprint, rope = fingerprint_of(model), (spec.inv_freq, spec.attention_scaling)
    prefix = list(prefix)
    kind = sequence_kind(fingerprint, cfg)
    geo = geometry_of(model)
    geometry = BlockGeometry(geo.num_layers, geo.num_kv_heads, geo.head_dim, cfg.block_tokens,
                             cfg.store_dtype)
    extra_blocks = max_new_tokens // cfg.block_tokens + 2
    capacity = len(prefix) // cfg.block_tokens + extra_blocks
    stored = client.lookup(prefix, kind, geometry)
    bundle = None
    if stored is not None:
        bundle = _load_bundle(stored.bundle, capacity, cfg, geometry, rope, fingerprint,
                              len(prefix))
    if bundle is not None:
        prefix_blocks, reused = stored.blocks, True
    else:
        k_pre, values = capture_prefill(model, torch.tensor(prefix))
        prefix_blocks = client.create(prefix, kind, geometry, len(prefix) // cfg.block_tokens + 1)
        bundle = build_sequence(k_pre, values, cfg, rope, fingerprint, prefix_blocks, capacity)
        client.save_bundle(prefix, kind, bundle)
        reused = False
    tail = HostBlockPool(geometry, extra_blocks, first_block=bundle.num_blocks)
    store = SplitBlockSource(prefix_blocks, bundle.num_blocks, tail)
    return SparseDecoder(model, cfg, bundle, store), reused


@torch.no_grad()
def generate(model: Any, input_ids: Any, client: SequenceStore | None = None,
             budget_tokens: int = 512, max_new_tokens: int = 32,
             eos_token_id: int | None = None, progress: bool = True,
             **options: Any) -> list[int]:
    """Greedy generation with sparse decode; returns the generated token ids.

    The prompt minus its last token is prefilled (or, if ``client`` holds it, its
    blocks and shadow bundle are reloaded); the last prompt token is the first
    decode step, so a resumed and a fresh prompt decode identically.

    Args:
        model: a transformers Llama-style causal LM (SmolLM2 on CPU works).
        input_ids: prompt token ids, a list or a ``[n]``/``[1, n]`` tensor.
        client: where blocks and bundles live: a :class:`DaemonSequenceStore` over a
            ``kvstore.client.Client`` persists them in the daemon, so another process
            reloads the bundle; a fresh in-process store if None.
        budget_tokens: tokens attended per sparse layer (see :class:`SparseConfig`).
        max_new_tokens: tokens to generate at most.
        eos_token_id: stop after generating this token.
        progress: draw a bar of the decode steps on stderr when it is a terminal.
        **options: other :class:`SparseConfig` fields (selector, rank, dense_layers, ...).

    Raises:
        InvalidArgument: an unsupported model, a bad option, or an empty prompt.
    """
    cfg = SparseConfig(budget_tokens=budget_tokens, **options)
    ids = _token_list(input_ids)
    store = client if client is not None else HostSequenceStore()  # an empty store is falsy
    decoder, reused = open_decoder(model, ids[:-1], cfg, store, max_new_tokens)
    log.info("sparse generate: %d prompt tokens, bundle %s", len(ids),
             "reused" if reused else "built")
    out: list[int] = []
    token = ids[-1]
    for _ in track(range(max_new_tokens), "sparse decode", enabled=progress):
        logits, _ = decoder.step(token)
        token = int(logits.argmax())
        out.append(token)
        if token == eos_token_id:
            break
    return out
