"""The test model's loader, kept for existing imports; it lives in ``kvstore.models.smollm2``."""

from kvstore.models.smollm2 import (
    GGUF_NAME,
    HEAD_DIM,
    NUM_KV_HEADS,
    NUM_LAYERS,
    ROPE_THETA,
    cache_dir,
    gguf_path,
    load_smollm2,
    publish_conversion,
    sample_text,
    sample_tokens,
)

__all__ = ["GGUF_NAME", "HEAD_DIM", "NUM_KV_HEADS", "NUM_LAYERS", "ROPE_THETA", "cache_dir",
           "gguf_path", "load_smollm2", "publish_conversion", "sample_text", "sample_tokens"]
