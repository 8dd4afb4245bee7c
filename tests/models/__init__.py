"""Helpers of the model tests: one SmolLM2 load per process, tiny random Llama-style models."""

from __future__ import annotations

import functools
from typing import Any


@functools.lru_cache(maxsize=1)
def smollm2() -> tuple[Any, Any]:
    """(model, tokenizer) of SmolLM2-135M, loaded once per test session (shared across modules)."""
    from kvstore.models.smollm2 import load_smollm2

    return load_smollm2()


def tiny_llama(rope_parameters: dict[str, Any] | None = None, seed: int = 0) -> Any:
    """A 2-layer random LlamaForCausalLM (head_dim 16, 2 KV heads) for fast, model-free checks."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
        rope_parameters=rope_parameters or {"rope_type": "default", "rope_theta": 10000.0},
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def tiny_qwen3(seed: int = 0) -> Any:
    """A 2-layer random Qwen3ForCausalLM (q_norm/k_norm before RoPE), same geometry."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(config).eval()
