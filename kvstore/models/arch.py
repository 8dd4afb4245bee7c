"""Which transformers models kvstore handles, and their geometry (no layer arithmetic here).

The one list of supported architectures: Llama-style decoders of HF transformers
with full attention. ``rag``, ``sparse``, the codec's calibration and
``integrations`` all check models with :func:`check_supported`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from kvstore.errors import InvalidArgument
from kvstore.layout import KVLayout

# model_type values whose decoder layers follow Llama's layout: pre-norm, q/k/v
# projections (Qwen3 adds q_norm/k_norm before RoPE), rotate_half RoPE, MLP.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# Attention implementations that honour an explicit additive 4-D mask.
MASKED_ATTENTION_IMPLS = frozenset({"sdpa", "eager"})


def text_config(model: Any) -> Any:
    """The decoder's config (the text part of a multimodal one)."""
    return model.config.get_text_config(decoder=True)


def check_supported(model: Any) -> None:
    """Raise InvalidArgument unless ``model`` is a Llama-style decoder with full attention.

    Raises:
        InvalidArgument: the model type, attention layout or cache layout is not handled.
    """
    config = text_config(model)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise InvalidArgument(
            f"model_type {model_type!r} is not handled; expected one of "
            f"{list(SUPPORTED_MODEL_TYPES)} (Llama-style decoders)"
        )
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        raise InvalidArgument(
            f"{type(model).__name__} has no .model.layers/.model.rotary_emb; "
            "pass a *ForCausalLM model of a Llama-style architecture"
        )
    layer_types = getattr(config, "layer_types", None) or []
    is_sliding = getattr(config, "sliding_window", None) is not None \
        and getattr(config, "use_sliding_window", True)
    if is_sliding or any(t != "full_attention" for t in layer_types):
        raise InvalidArgument(
            f"layer types {sorted(set(layer_types))} / sliding_window "
            f"{getattr(config, 'sliding_window', None)}: only full-attention caches can be "
            "stored and reused"
        )


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def layout_for(model: Any, dtype: str = "float16", chunk_tokens: int = 256) -> KVLayout:
    """The KVLayout of ``model``'s cache, stored as ``dtype`` in chunks of ``chunk_tokens``."""
    config = text_config(model)
    return KVLayout(num_layers=config.num_hidden_layers, num_kv_heads=config.num_key_value_heads,
                    head_dim=_head_dim(config), dtype=dtype, chunk_tokens=chunk_tokens)


def check_layout(model: Any, layout: KVLayout) -> None:
    """Raise InvalidArgument unless the client's layout has the model's KV geometry."""
    config = text_config(model)
    want = (config.num_hidden_layers, config.num_key_value_heads, _head_dim(config))
    got = (layout.num_layers, layout.num_kv_heads, layout.head_dim)
    if want != got:
        raise InvalidArgument(
            f"client layout has (layers, kv_heads, head_dim)={got}, the model has {want}; "
            "build the client with kvstore.integrations.transformers.layout_for(model)"
        )


@dataclass(frozen=True, slots=True)
class ModelGeometry:
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float  # softmax scale, 1/sqrt(head_dim) unless the config says otherwise


def geometry_of(model: Any) -> ModelGeometry:
    """Check that ``model`` is supported and return its attention geometry."""
    check_supported(model)
    config = text_config(model)
    attn = model.model.layers[0].self_attn
    return ModelGeometry(config.num_hidden_layers, config.num_attention_heads,
                         config.num_key_value_heads, attn.head_dim, float(attn.scaling))


def fingerprint_of(model: Any) -> str:
    """A stable id of the weights: config plus a digest of the first layer's k_proj and norm."""
    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True,
                                       default=str).encode())
    layer = model.model.layers[0]
    for tensor in (layer.self_attn.k_proj.weight, model.model.norm.weight):
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:32]
