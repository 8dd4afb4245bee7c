"""CacheBlend selection: the query probe reads what the model's own attention reads."""

from __future__ import annotations

import pytest
import torch

from kvstore.models.cache import kv_from_cache
from kvstore.rag import blend as _blend
from tests.models import tiny_llama


@torch.inference_mode()
def test_blend_probe_reads_equal_the_models_attention_of_the_query_over_the_context():
    model = tiny_llama()  # 4 query heads over 2 KV heads: checks the grouped-query mapping
    model.set_attn_implementation("eager")  # eager returns its attention weights
    ids = torch.randint(0, 128, (40,), generator=torch.Generator().manual_seed(1))
    num_ctx = 30
    out = model(
        input_ids=ids[None], use_cache=True, output_attentions=True, output_hidden_states=True
    )
    weights = out.attentions[1][0, :, num_ctx:, :num_ctx]  # layer 1: [heads, query, ctx]
    want = (weights / weights.sum(-1, keepdim=True)).mean(dim=(0, 1))
    # Exact context KV, so the probe sees what the full forward saw.
    kv = kv_from_cache(out.cache, 0, len(ids), torch.float32)
    kv[:, :, :, num_ctx:] = 0
    cos_sin = model.model.rotary_emb(out.hidden_states[0], position_ids=torch.arange(40)[None])
    query = torch.arange(num_ctx, len(ids))
    _, reads = _blend._run_rows(
        model, out.hidden_states[1][:, query], query, cos_sin, _blend._ScatterCache(kv), num_ctx
    )
    torch.testing.assert_close(reads, want, atol=1e-6, rtol=0)
    assert reads.sum().item() == pytest.approx(1.0)
