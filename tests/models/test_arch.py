"""One list of supported models: sparse decode and RAG accept and refuse the same ones."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kvstore.errors import InvalidArgument
from kvstore.models.arch import SUPPORTED_MODEL_TYPES, check_supported, geometry_of, layout_for
from kvstore.models.rope import rope_spec
from kvstore.sparse import HostSequenceStore, SparseConfig, open_decoder
from tests.models import tiny_llama, tiny_qwen3

MODELS = {"llama": tiny_llama, "qwen3": tiny_qwen3}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_sparse_dense_decode_matches_transformers_logits_for_each_supported_type(name) -> None:
    model = MODELS[name]()
    assert model.config.model_type in SUPPORTED_MODEL_TYPES
    ids = torch.randint(0, 128, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0, -1].float()
    cfg = SparseConfig(selector="dense", store_dtype="float32", block_tokens=8)
    decoder, _ = open_decoder(model, ids[:-1], cfg, HostSequenceStore(), max_new_tokens=1)
    got, _ = decoder.step(ids[-1])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def _unsupported() -> Any:
    model = tiny_llama()
    model.config.model_type = "gemma"
    return model


def test_unsupported_type_is_refused_by_every_user_alike() -> None:
    model = _unsupported()
    for check in (check_supported, geometry_of, rope_spec):
        with pytest.raises(InvalidArgument, match="model_type 'gemma' is not handled"):
            check(model)


def test_layout_for_reads_the_models_kv_geometry() -> None:
    layout = layout_for(tiny_qwen3(), "float16", 64)
    assert (layout.num_layers, layout.num_kv_heads, layout.head_dim) == (2, 2, 16)
