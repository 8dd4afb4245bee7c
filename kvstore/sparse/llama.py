"""The model side for HF transformers Llama-style models: RoPE, prefill capture, one decode step.

Decode runs the decoder layers itself (norm, q/k/v projections, RoPE, attention
by the per-layer state, o_proj, MLP), so each layer's attention is whatever the
sparse state decides, with no cache object of transformers in between. Pre-RoPE
keys at prefill come from forward hooks on ``k_proj``/``v_proj``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from kvstore.errors import InvalidArgument
from kvstore.kernels.sparse_gather import rope_rotate_reference
from kvstore.sparse.blocks import Rope

# Models whose decoder layers have the Llama structure (no qk-norm, no sliding window).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
_STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class LayerState(Protocol):
    def step(self, q: torch.Tensor, k_pre: torch.Tensor, k_post: torch.Tensor,
             v: torch.Tensor) -> tuple[torch.Tensor, Any]: ...


@dataclass(frozen=True, slots=True)
class ModelGeometry:
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float  # softmax scale, 1/sqrt(head_dim) unless the config says otherwise


def geometry_of(model: Any) -> ModelGeometry:
    """Check that ``model`` is Llama-style and return its attention geometry."""
    config = model.config
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise InvalidArgument(f"sparse decode supports {SUPPORTED_MODEL_TYPES} models, "
                              f"got model_type={config.model_type!r}")
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        raise InvalidArgument("sliding-window attention models are not supported")
    attn = model.model.layers[0].self_attn
    return ModelGeometry(config.num_hidden_layers, config.num_attention_heads,
                         config.num_key_value_heads, attn.head_dim, float(attn.scaling))


def rope_of(model: Any) -> Rope:
    """(inv_freq, attention scaling) of the model's rotary embedding (static types only)."""
    rotary = model.model.rotary_emb
    if getattr(rotary, "rope_type", "default") not in _STATIC_ROPE_TYPES:
        raise InvalidArgument(f"rope type {rotary.rope_type!r} changes with length; "
                              f"supported: {_STATIC_ROPE_TYPES}")
    return rotary.inv_freq.detach().float().cpu().clone(), float(rotary.attention_scaling)


def fingerprint_of(model: Any) -> str:
    """A stable id of the weights: config plus a digest of the first layer's k_proj and norm."""
    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True,
                                       default=str).encode())
    layer = model.model.layers[0]
    for tensor in (layer.self_attn.k_proj.weight, model.model.norm.weight):
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:32]


@torch.no_grad()
def capture_prefill(model: Any, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the prompt; return pre-RoPE keys and values, each ``[L, Hkv, n, D]`` float32."""
    geo = geometry_of(model)
    keys: list[torch.Tensor] = []
    values: list[torch.Tensor] = []

    def grab(store: list[torch.Tensor]):
        def hook(_module: Any, _args: Any, out: torch.Tensor) -> None:
            store.append(out[0].view(-1, geo.num_kv_heads, geo.head_dim).transpose(0, 1).float())
        return hook

    handles = []
    for layer in model.model.layers:
        handles.append(layer.self_attn.k_proj.register_forward_hook(grab(keys)))
        handles.append(layer.self_attn.v_proj.register_forward_hook(grab(values)))
    try:
        model.model(input_ids=input_ids.view(1, -1), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(keys), torch.stack(values)


@torch.no_grad()
def decode_token(model: Any, layers: list[LayerState], token: int, position: int,
                 rope: Rope) -> tuple[torch.Tensor, list[Any]]:
    """One decode step through every layer; returns (logits ``[vocab]``, per-layer stats)."""
    geo = geometry_of(model)
    device = model.model.embed_tokens.weight.device
    hidden = model.model.embed_tokens(torch.tensor([[token]], device=device))
    pos = torch.tensor([position])
    stats = []
    for block, state in zip(model.model.layers, layers, strict=True):
        attn = block.self_attn
        x = block.input_layernorm(hidden)
        q = attn.q_proj(x).view(geo.num_heads, geo.head_dim)
        k_pre = attn.k_proj(x).view(geo.num_kv_heads, geo.head_dim)
        v = attn.v_proj(x).view(geo.num_kv_heads, geo.head_dim)
        q_post = rope_rotate_reference(q, pos, *rope)
        k_post = rope_rotate_reference(k_pre, pos, *rope)
        out, layer_stats = state.step(q_post, k_pre, k_post, v)
        stats.append(layer_stats)
        hidden = hidden + attn.o_proj(out.to(x.dtype).view(1, 1, -1))
        hidden = hidden + block.mlp(block.post_attention_layernorm(hidden))
    logits = model.lm_head(model.model.norm(hidden))
    return logits[0, -1].float(), stats
