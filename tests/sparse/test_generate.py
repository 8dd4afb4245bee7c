"""Sparse generation on the real SmolLM2 (small contexts; the 7K figures are in the bench)."""

from __future__ import annotations

import pytest
import torch

from kvstore.sparse import HostSequenceStore, SparseConfig, generate, open_decoder
from tests.sparse.conftest import smollm2_with_prompt

pytestmark = [pytest.mark.model, pytest.mark.slow]


@pytest.fixture(scope="module")
def smollm2():
    return smollm2_with_prompt(1000)


def test_dense_decode_loop_matches_transformers_logits(smollm2) -> None:
    model, ids = smollm2
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0, -1].float()
    cfg = SparseConfig(selector="dense", store_dtype="float32")
    decoder, reused = open_decoder(model, ids[:-1], cfg, HostSequenceStore(), max_new_tokens=1)
    got, _ = decoder.step(ids[-1])
    assert not reused
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


def test_generate_equals_dense_when_budget_covers_context_and_resumes(smollm2) -> None:
    model, ids = smollm2
    store = HostSequenceStore()
    dense = generate(model, ids, store, max_new_tokens=10, selector="dense")
    sparse = generate(model, ids, store, budget_tokens=512, max_new_tokens=10,
                      rank=None, store_dtype="float32")
    assert sparse[:4] == dense[:4]  # low-rank keys change logits slightly; greedy holds
    decoder, reused = open_decoder(model, ids[:-1], SparseConfig(store_dtype="float32"),
                                   store, max_new_tokens=10)
    assert reused and len(store) == 2  # the bundle was reloaded, not rebuilt
    assert generate(model, ids, store, budget_tokens=512, max_new_tokens=10,
                    store_dtype="float32") == sparse


def test_generate_two_stage_under_tight_budget_stays_close(smollm2) -> None:
    model, ids = smollm2
    dense = generate(model, ids, max_new_tokens=6, selector="dense")
    sparse = generate(model, ids, budget_tokens=160, max_new_tokens=6)
    assert len(sparse) == 6
    assert sum(a == b for a, b in zip(sparse, dense, strict=True)) >= 3
