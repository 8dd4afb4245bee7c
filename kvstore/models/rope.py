"""RoPE of Llama-style transformers models: read it from a model, rotate keys and queries.

Why re-encoding cached keys is safe outside the model: a Llama-style attention
applies RoPE as ``k * cos(p f) + rotate_half(k) * sin(p f)`` (times the rope
type's constant ``attention_scaling``) with a fixed vector of inverse frequencies
``f``. Rotations compose, so a cached post-RoPE key at position ``p`` is taken
back to position 0 with the inverse rotation and on to any position ``q`` with
the forward one. Both use the model's own ``inv_freq`` buffer and compute angles
exactly as the model does (``float32(p) * inv_freq``), so a key moved to ``q``
matches what the model computes at ``q`` up to float rounding.

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
from kvstore.models.arch import check_supported, text_config

# Rope types whose inverse frequencies are fixed for every sequence length.
STATIC_ROPE_TYPES = frozenset({"default", "linear", "llama3", "yarn"})


@dataclass(frozen=True, slots=True)
class RopeSpec:
    """The model's RoPE, enough to move cached keys between positions."""

    rope_type: str  # one of STATIC_ROPE_TYPES
    inv_freq: torch.Tensor  # [head_dim // 2] float32, a copy of the model's own buffer
    attention_scaling: float  # the rope type's constant factor on cos and sin (1.0 mostly)


def rope_spec(model: Any) -> RopeSpec:
    """Read and validate the model's RoPE from its config and rotary embedding module.

    Raises:
        InvalidArgument: an unsupported model, a rope type that is unknown or
            length-dependent, or partial RoPE.
    """
    check_supported(model)
    config = text_config(model)
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
    rotary = model.model.rotary_emb
    inv_freq = rotary.inv_freq.detach().to("cpu", torch.float32).clone()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if inv_freq.numel() * 2 != head_dim:
        raise InvalidArgument(
            f"rotary inv_freq has {inv_freq.numel()} entries, head_dim {head_dim} needs "
            f"{head_dim // 2}; partial RoPE is not handled"
        )
    return RopeSpec(rope_type, inv_freq, float(getattr(rotary, "attention_scaling", 1.0)))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[-x2, x1]`` of ``x = [x1, x2]`` along the last axis (the Llama RoPE form)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
           scaling: float = 1.0, inverse: bool = False) -> torch.Tensor:
    """Llama RoPE (rotate-half form) of ``x [..., D]`` at ``positions``, in float32.

    Args:
        x: ``[..., D]``, any float dtype.
        positions: integer positions of shape ``x.shape[:-1]`` or broadcastable to it.
        inv_freq: ``[D / 2]`` inverse frequencies.
        scaling: the rope type's ``attention_scaling`` (1.0 moves keys without it).
        inverse: rotate by ``-positions`` (post-RoPE keys back to position 0).
    """
    angles = positions.to(x.device).float()[..., None] * inv_freq.to(x.device).float()
    cos, sin = angles.cos() * scaling, angles.sin() * scaling  # [..., D/2]
    if inverse:
        sin = -sin
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def rotate_keys(
    keys: torch.Tensor, spec: RopeSpec, positions: torch.Tensor, inverse: bool = False
) -> torch.Tensor:
    """Apply RoPE for ``positions`` to cached ``keys`` (or undo it with ``inverse``).

    The constant ``attention_scaling`` is left out: the cached keys carry it already.

    Args:
        keys: ``[..., tokens, head_dim]``, any float dtype; computed in float32.
        spec: the model's RoPE (see :func:`rope_spec`).
        positions: ``[tokens]`` integer positions.
        inverse: rotate by ``-positions`` (post-RoPE keys back to position 0).

    Returns:
        Rotated keys, same shape and dtype as ``keys``.
    """
    return rotate(keys, positions, spec.inv_freq, inverse=inverse).to(keys.dtype)
