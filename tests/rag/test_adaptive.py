"""build_cache's adaptive recompute within a TTFT budget, and passages stored compressed."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from kvstore.models.arch import layout_for
from kvstore.rag import build_cache, build_cache_naive, stored_chunk_tokens
from kvstore.rag.budget import cost_model
from tests.conftest import make_config
from tests.models import smollm2

pytestmark = [pytest.mark.model, pytest.mark.slow]
_names = itertools.count()
CHUNK_TOKENS = 64


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from kvstore.server.app import ServerThread

    config = make_config(
        tmp_path_factory.mktemp("kvstore"), **{"tiers.cpu.capacity_bytes": 128 << 20}
    )
    with ServerThread(config) as server:
        yield server


def _client(daemon: Any, codec: str = "raw") -> Any:
    from kvstore import Client

    layout = layout_for(smollm2()[0], "float16", 64)
    return Client(daemon.address, f"adaptive-{next(_names)}", layout, codec=codec)


def _prompt(num_chunks: int) -> tuple[list[int], list[list[int]], list[int]]:
    """(prefix, chunks, question) of pydoc_data.topics passages."""
    from pydoc_data.topics import topics

    tokenizer = smollm2()[1]
    names = [n for n in sorted(topics) if len(topics[n]) > 8 * CHUNK_TOKENS][5::9]
    chunks = [tokenizer(topics[n])["input_ids"][:CHUNK_TOKENS] for n in names[:num_chunks]]
    prefix = tokenizer("Answer from the documentation below.\n\n")["input_ids"]
    query = tokenizer(f"\n\nQuestion: what is '{names[0]}'?\nAnswer:")["input_ids"]
    return prefix, chunks, query


def test_build_cache_keeps_the_predicted_speedup_within_min_speedup(daemon):
    model, _ = smollm2()
    prefix, chunks, query = _prompt(4)
    num_tokens = len(prefix) + len(query) + 4 * CHUNK_TOKENS
    with _client(daemon) as client:
        runs = {
            s: build_cache(model, client, chunks, query, prefix, min_speedup=s)[2]
            for s in (1.5, 3.0, 4.0)
        }
    for min_speedup, stats in runs.items():
        rows = stats.num_recomputed + stats.num_prefilled
        assert stats.predicted_speedup >= min_speedup, (min_speedup, stats)
        assert rows <= cost_model().max_rows(num_tokens, model.config.num_hidden_layers, min_speedup)
        assert stats.recompute_ratio <= stats.max_recompute_ratio
    assert runs[4.0].max_recompute_ratio < runs[3.0].max_recompute_ratio
    assert runs[3.0].max_recompute_ratio < runs[1.5].max_recompute_ratio
    assert runs[4.0].num_recomputed <= runs[3.0].num_recomputed <= runs[1.5].num_recomputed


def test_adaptive_ratio_rises_with_the_number_of_passages(daemon):
    model, _ = smollm2()
    prefix, chunks, query = _prompt(4)
    with _client(daemon) as client:
        # A loose budget, so the deviation decides and not the cap.
        one = build_cache(model, client, chunks[:1], query, prefix, min_speedup=1.2)[2]
        four = build_cache(model, client, chunks, query, prefix, min_speedup=1.2)[2]
    # The first passage, computed after the prefix, is exact: only the floor is recomputed.
    assert one.recompute_ratio == pytest.approx(0.05, abs=1 / CHUNK_TOKENS)
    assert four.recompute_ratio > one.recompute_ratio + 0.02, (one, four)
    assert four.recompute_ratio < four.max_recompute_ratio  # not just the budget


def test_adaptive_ratio_rises_when_passages_were_computed_without_the_prefix(daemon):
    model, _ = smollm2()
    prefix, chunks, query = _prompt(2)
    with _client(daemon) as client:
        after_prefix = build_cache(model, client, chunks, query, prefix, min_speedup=1.2)[2]
        alone = build_cache(model, client, chunks, query, prefix, chunk_lead=[], min_speedup=1.2)
    assert alone[2].recompute_ratio > after_prefix.recompute_ratio + 0.02, (after_prefix, alone)


@torch.inference_mode()
def test_passages_stored_compressed_round_trip_and_still_blend(daemon):
    from kvstore.codec import autocal, decode, encode

    model, _ = smollm2()
    prefix, chunks, query = _prompt(3)
    with _client(daemon) as raw, _client(daemon, codec="balanced") as packed:
        build_cache(model, raw, chunks, query, prefix, recompute_ratio=0.15)
        _, cold_logits, cold = build_cache(model, packed, chunks, query, prefix, 0.15)
        _, warm_logits, warm = build_cache(model, packed, chunks, query, prefix, 0.15)
        key = stored_chunk_tokens(chunks[1], prefix)
        exact = raw.get_chunk(key, as_numpy=True)
        stored = torch.as_tensor(packed.get_chunk(key))
        naive_logits = build_cache_naive(model, raw, chunks, query, prefix)[1]
    assert (cold.num_chunks_encoded, warm.num_chunks_hit) == (3, 3)
    # The store holds exactly what the codec makes of the raw KV, and a miss uses it too.
    # (with the table the client's automatic calibration picked for the namespace)
    table = autocal.table_for(packed.namespace, raw.layout, exact)
    want = torch.as_tensor(decode(encode(exact, raw.layout, "balanced", table=table)))
    torch.testing.assert_close(stored, want, atol=0, rtol=0)
    assert not torch.equal(stored, torch.as_tensor(exact))
    torch.testing.assert_close(cold_logits, warm_logits, atol=0, rtol=0)
    ids = prefix + sum(chunks, []) + query
    full = model(input_ids=torch.tensor([ids]), logits_to_keep=1).logits[0, -1].float()

    def kl(logits: torch.Tensor) -> float:
        return F.kl_div(
            logits.log_softmax(-1), full.log_softmax(-1), log_target=True, reduction="sum"
        ).item()

    assert warm_logits.argmax() == full.argmax()
    assert kl(warm_logits) < 0.5 * kl(naive_logits), (kl(warm_logits), kl(naive_logits))
