"""Model checks and RoPE re-encoding of cached keys for Llama-style transformers models.

Why this is safe to do outside the model: a Llama-style attention applies RoPE as
``k * cos(p f) + rotate_half(k) * sin(p f)`` (times the rope type's constant
``attention_scaling``) with a fixed vector of inverse frequencies ``f``. Rotations
compose, so a cached post-RoPE key at position ``p`` is taken back to position 0
with the inverse rotation and on to any position ``q`` with the forward one. Both
use the model's own ``inv_freq`` buffer and compute angles exactly as the model
does (``float32(p) * inv_freq``), so a key moved to ``q`` matches what the model
computes at ``q`` up to float rounding; the constant scaling rides along untouched.

That only holds when ``f`` does not depend on the sequence length and every
head dimension is rotated. Rope types ``default``, ``linear``, ``llama3`` and
``yarn`` qualify; ``dynamic`` and ``longrope`` change ``f`` with the context
length, partial rotary factors leave dimensions unrotated, and anything else is
unknown. Those models get :class:`~kvstore.errors.InvalidArgument`, never a
silently wrong cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kvstore.errors import InvalidArgument
from kvstore.layout import KVLayout

# Rope types whose inverse frequencies are fixed for every sequence length.
STATIC_ROPE_TYPES = frozenset({"default", "linear", "llama3", "yarn"})
# model_type values whose decoder layers follow Llama's layout: pre-norm,
# q/k/v projections (Qwen3 adds a k_norm before RoPE), rotate_half RoPE, MLP.
LLAMA_STYLE_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
# Attention implementations that honour an explicit additive 4-D mask.
MASKED_ATTENTION_IMPLS = frozenset({"sdpa", "eager"})


@dataclass(frozen=True, slots=True)
class RopeSpec:
    """The model's RoPE, enough to move cached keys between positions."""

    rope_type: str  # one of STATIC_ROPE_TYPES
    inv_freq: torch.Tensor  # [head_dim // 2] float32, the model's own buffer


def _config(model: Any) -> Any:
    return model.config.get_text_config(decoder=True)


def check_llama_style(model: Any) -> None:
    """Raise InvalidArgument unless ``model`` is a Llama-style decoder with full attention.

    Raises:
        InvalidArgument: the model type, attention layout or cache layout is not handled.
    """
    config = _config(model)
    model_type = getattr(config, "model_type", None)
    if model_type not in LLAMA_STYLE_MODEL_TYPES:
        raise InvalidArgument(
            f"model_type {model_type!r} is not handled; expected one of "
            f"{sorted(LLAMA_STYLE_MODEL_TYPES)} (Llama-style decoders)"
        )
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        raise InvalidArgument(
            f"{type(model).__name__} has no .model.layers/.model.rotary_emb; "
            "pass a *ForCausalLM model of a Llama-style architecture"
        )
    layer_types = getattr(config, "layer_types", None) or []
    is_sliding = getattr(config, "sliding_window", None) is not None
    if is_sliding or any(t != "full_attention" for t in layer_types):
        raise InvalidArgument(
            f"layer types {sorted(set(layer_types))} / sliding_window "
            f"{getattr(config, 'sliding_window', None)}: only full-attention caches can be "
            "stored and reused"
        )


def check_layout(model: Any, layout: KVLayout) -> None:
    """Raise InvalidArgument unless the client's layout has the model's KV geometry."""
    config = _config(model)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    want = (config.num_hidden_layers, config.num_key_value_heads, head_dim)
    got = (layout.num_layers, layout.num_kv_heads, layout.head_dim)
    if want != got:
        raise InvalidArgument(
            f"client layout has (layers, kv_heads, head_dim)={got}, the model has {want}; "
            "build the client with kvstore.integrations.transformers.layout_for(model)"
        )


def rope_spec(model: Any) -> RopeSpec:
    """Read and validate the model's RoPE from its config and rotary embedding module.

    Raises:
        InvalidArgument: the rope type is unknown or length-dependent, or RoPE is partial.
    """
    check_llama_style(model)
    config = _config(model)
    params = getattr(config, "rope_parameters", None) or {}
    if "rope_type" not in params:  # per-layer-type dicts (e.g. Gemma) or nothing at all
        raise InvalidArgument(
            f"rope_parameters {params!r} have no single rope_type; cannot re-encode positions"
        )
    rope_type = params["rope_type"]
    if rope_type not in STATIC_ROPE_TYPES:
        raise InvalidArgument(
            f"rope_type {rope_type!r} is not handled: its frequencies are unknown or depend on "
            f"the sequence length; handled types are {sorted(STATIC_ROPE_TYPES)}"
        )
    factor = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    if factor not in (None, 1, 1.0):
        raise InvalidArgument(f"partial_rotary_factor={factor} is not handled (only full RoPE)")
    inv_freq = model.model.rotary_emb.inv_freq.detach().to("cpu", torch.float32)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if inv_freq.numel() * 2 != head_dim:
        raise InvalidArgument(
            f"rotary inv_freq has {inv_freq.numel()} entries, head_dim {head_dim} needs "
            f"{head_dim // 2}; partial RoPE is not handled"
        )
    return RopeSpec(rope_type=rope_type, inv_freq=inv_freq)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _cos_sin(spec: RopeSpec, positions: torch.Tensor, device: Any) -> tuple[torch.Tensor, ...]:
    # Same arithmetic as LlamaRotaryEmbedding.forward, minus attention_scaling.
    freqs = positions.to(device).float()[:, None] * spec.inv_freq.to(device)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)  # [tokens, head_dim]
    return emb.cos(), emb.sin()


def rotate_keys(
    keys: torch.Tensor, spec: RopeSpec, positions: torch.Tensor, inverse: bool = False
) -> torch.Tensor:
    """Apply RoPE for ``positions`` to ``keys`` (or undo it with ``inverse``).

    Args:
        keys: ``[..., tokens, head_dim]``, any float dtype; computed in float32.
        spec: the model's RoPE (see :func:`rope_spec`).
        positions: ``[tokens]`` integer positions.
        inverse: rotate by ``-positions`` (post-RoPE keys back to position 0).

    Returns:
        Rotated keys, same shape and dtype as ``keys``.
    """
    cos, sin = _cos_sin(spec, positions, keys.device)
    k = keys.float()
    out = k * cos - _rotate_half(k) * sin if inverse else k * cos + _rotate_half(k) * sin
    return out.to(keys.dtype)
