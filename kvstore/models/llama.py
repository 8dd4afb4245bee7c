"""The layers of Llama-style decoders, run outside the model: projections, prefill capture,
one decode step (``rag``'s selective recompute and ``sparse`` decode use them).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from kvstore.models.arch import geometry_of
from kvstore.models.rope import rotate, rotate_half

# ------------------------------------------------------------ one layer's projections

def project_keys(attn: Any, x: torch.Tensor) -> torch.Tensor:
    """Pre-RoPE keys ``[..., kv_heads, dim]`` of the normed input ``x [..., hidden]``."""
    k = attn.k_proj(x).view(*x.shape[:-1], -1, attn.head_dim)
    return attn.k_norm(k) if hasattr(attn, "k_norm") else k  # Qwen3 normalises keys


def project_queries(attn: Any, x: torch.Tensor) -> torch.Tensor:
    """Pre-RoPE queries ``[..., heads, dim]`` of the normed input ``x [..., hidden]``."""
    q = attn.q_proj(x).view(*x.shape[:-1], -1, attn.head_dim)
    return attn.q_norm(q) if hasattr(attn, "q_norm") else q  # Qwen3


def layer_kv(layer: Any, hidden: torch.Tensor, cos: torch.Tensor,
             sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Post-RoPE K and V ``[1, heads, tokens, dim]`` that ``layer`` computes from its input.

    ``cos``/``sin`` are the model's own rotary embedding of the tokens' positions.
    """
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    k = project_keys(attn, x).transpose(1, 2)
    v = attn.v_proj(x).view(*x.shape[:-1], -1, attn.head_dim).transpose(1, 2)
    return k * cos[:, None] + rotate_half(k) * sin[:, None], v


def layer_queries(layer: Any, hidden: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor) -> torch.Tensor:
    """Post-RoPE queries ``[1, heads, rows, dim]`` that ``layer`` computes from its input."""
    x = layer.input_layernorm(hidden)
    q = project_queries(layer.self_attn, x).transpose(1, 2)
    return q * cos[:, None] + rotate_half(q) * sin[:, None]


# ------------------------------------------------------------ prefill capture and decode

class LayerState(Protocol):
    def step(self, q: torch.Tensor, k_pre: torch.Tensor, k_post: torch.Tensor,
             v: torch.Tensor) -> tuple[torch.Tensor, Any]: ...


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
        attn = layer.self_attn
        # Qwen3's k_norm runs after k_proj: its output is the pre-RoPE key.
        key_module = attn.k_norm if hasattr(attn, "k_norm") else attn.k_proj
        handles.append(key_module.register_forward_hook(grab(keys)))
        handles.append(attn.v_proj.register_forward_hook(grab(values)))
    try:
        model.model(input_ids=input_ids.view(1, -1), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(keys), torch.stack(values)


@torch.no_grad()
def decode_token(model: Any, layers: list[LayerState], token: int, position: int,
                 rope: tuple[torch.Tensor, float]) -> tuple[torch.Tensor, list[Any]]:
    """One decode step through every layer; returns (logits ``[vocab]``, per-layer stats).

    ``rope`` is ``(inv_freq, attention_scaling)``; each layer's attention is what its
    ``state`` computes from the post-RoPE query and the new token's keys and value.
    """
    geo = geometry_of(model)
    device = model.model.embed_tokens.weight.device
    hidden = model.model.embed_tokens(torch.tensor([[token]], device=device))
    pos = torch.tensor([position])
    stats = []
    for block, state in zip(model.model.layers, layers, strict=True):
        attn = block.self_attn
        x = block.input_layernorm(hidden)
        q = project_queries(attn, x).view(geo.num_heads, geo.head_dim)
        k_pre = project_keys(attn, x).view(geo.num_kv_heads, geo.head_dim)
        v = attn.v_proj(x).view(geo.num_kv_heads, geo.head_dim)
        q_post = rotate(q, pos, *rope)
        k_post = rotate(k_pre, pos, *rope)
        out, layer_stats = state.step(q_post, k_pre, k_post, v)
        stats.append(layer_stats)
        hidden = hidden + attn.o_proj(out.to(x.dtype).view(1, 1, -1))
        hidden = hidden + block.mlp(block.post_attention_layernorm(hidden))
    logits = model.lm_head(model.model.norm(hidden))
    return logits[0, -1].float(), stats


def capture_queries(model: Any, run: Any) -> tuple[Any, list[torch.Tensor]]:
    """``run()``'s result and each layer's pre-RoPE queries ``[1, tokens, heads * dim]``
    of the tokens it ran (after Qwen3's q_norm), in layer order."""
    captured: list[torch.Tensor] = []
    hooks = []
    for layer in model.model.layers:
        attn = layer.self_attn
        module = attn.q_norm if hasattr(attn, "q_norm") else attn.q_proj
        hooks.append(module.register_forward_hook(
            lambda _m, _i, out: captured.append(out.detach().flatten(-2)
                                                if out.dim() == 4 else out.detach())))
    try:
        result = run()
    finally:
        for hook in hooks:
            hook.remove()
    return result, captured
