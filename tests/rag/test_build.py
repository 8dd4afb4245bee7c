"""kvstore.rag.build on a real daemon: exact at ratio 1, close to full prefill, beats naive."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from kvstore.errors import InvalidArgument
from kvstore.integrations.transformers import layout_for
from kvstore.rag import build_cache, build_cache_naive, stored_chunk_tokens
from tests.conftest import make_config
from tests.models import smollm2, tiny_llama

_names = itertools.count()
NUM_PROMPTS, NUM_CHUNKS, CHUNK_TOKENS, ANSWER_TOKENS = 4, 3, 96, 8


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from kvstore.server.app import ServerThread

    config = make_config(
        tmp_path_factory.mktemp("kvstore"), **{"tiers.cpu.capacity_bytes": 256 << 20}
    )
    with ServerThread(config) as server:
        yield server


def _client(daemon: Any, model: Any, dtype: str = "float16") -> Any:
    from kvstore import Client

    return Client(daemon.address, f"rag-{next(_names)}", layout_for(model, dtype, 64))


def _prompt(tokenizer: Any, index: int) -> tuple[list[int], list[list[int]], list[int]]:
    """(prefix, chunks, question): NUM_CHUNKS pydoc_data.topics passages and a question on one."""
    from pydoc_data.topics import topics

    names = [n for n in sorted(topics) if len(topics[n]) > 8 * CHUNK_TOKENS]
    picked = [names[(index * NUM_CHUNKS + i) * 7 % len(names)] for i in range(NUM_CHUNKS)]
    chunks = [tokenizer(topics[n])["input_ids"][:CHUNK_TOKENS] for n in picked]
    prefix = tokenizer("Answer using the documentation below.\n\n")["input_ids"]
    question = (
        f"\n\nQuestion: what does the documentation say about '{picked[index % 3]}'?\nAnswer:"
    )
    return prefix, chunks, tokenizer(question)["input_ids"]


@torch.inference_mode()
def _reference(model: Any, ids: list[int]) -> tuple[list[int], torch.Tensor]:
    """Greedy answer of a full prefill and its next-token logits ``[ANSWER_TOKENS, vocab]``."""
    out = model.generate(
        torch.tensor([ids]),
        max_new_tokens=ANSWER_TOKENS,
        min_new_tokens=ANSWER_TOKENS,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    return out.sequences[0, len(ids) :].tolist(), torch.stack(out.logits, dim=1)[0].float()


@torch.inference_mode()
def _continue(model: Any, cache: Any, logits: torch.Tensor, answer: list[int]) -> torch.Tensor:
    """Next-token logits after the prompt and after each teacher-forced answer token but the last"""
    out = model(input_ids=torch.tensor([answer[:-1]]), cache=cache, use_cache=True)
    return torch.cat((logits[None], out.logits[0].float()))  # [answer, vocab]


@torch.inference_mode()
def _full(model: Any, ids: list[int], answer: list[int]) -> torch.Tensor:
    out = model(input_ids=torch.tensor([ids + answer[:-1]]), logits_to_keep=len(answer))
    return out.logits[0].float()


def _kl(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Mean KL(ref || approx) per position, in nats."""
    return F.kl_div(
        F.log_softmax(approx, -1), F.log_softmax(ref, -1), log_target=True, reduction="batchmean"
    ).item()


@dataclass
class _Quality:
    agree: list[list[bool]]  # top-1 agreement at the default ratio, per prompt and answer token
    kl_blend: list[float]  # per prompt
    kl_query_aware: list[float]
    kl_no_lead: list[float]  # chunks computed with nothing before them (chunk_lead=[])
    kl_naive: list[float]


@pytest.fixture(scope="module")
def shared_client(daemon) -> Iterator[Any]:
    """One namespace for the quality prompts, so later tests find their chunks stored."""
    with _client(daemon, smollm2()[0]) as client:
        yield client


@pytest.fixture(scope="module")
def quality(shared_client) -> _Quality:
    model, tokenizer = smollm2()
    client = shared_client
    result = _Quality([], [], [], [], [])
    for index in range(NUM_PROMPTS):
        prefix, chunks, query = _prompt(tokenizer, index)
        answer, ref = _reference(model, prefix + sum(chunks, []) + query)
        cache, logits, _ = build_cache(model, client, chunks, query, prefix=prefix)
        blended = _continue(model, cache, logits, answer)
        cache, logits, _ = build_cache(model, client, chunks, query, prefix, query_aware=True)
        query_aware = _continue(model, cache, logits, answer)
        cache, logits, _ = build_cache(model, client, chunks, query, prefix, chunk_lead=[])
        no_lead = _continue(model, cache, logits, answer)
        cache, logits = build_cache_naive(model, client, chunks, query, prefix=prefix)
        naive = _continue(model, cache, logits, answer)
        result.agree.append((blended.argmax(-1) == ref.argmax(-1)).tolist())
        result.kl_blend.append(_kl(ref, blended))
        result.kl_query_aware.append(_kl(ref, query_aware))
        result.kl_no_lead.append(_kl(ref, no_lead))
        result.kl_naive.append(_kl(ref, naive))
    return result


@pytest.mark.model
@pytest.mark.slow
def test_build_cache_equals_full_prefill_when_recompute_ratio_is_one(shared_client, quality):
    model, tokenizer = smollm2()
    prefix, chunks, query = _prompt(tokenizer, 0)  # chunks stored by the quality run
    cache, logits, stats = build_cache(
        model, shared_client, chunks, query, prefix, recompute_ratio=1.0
    )
    ids = prefix + sum(chunks, []) + query
    full = _full(model, ids, [0])[-1]
    torch.testing.assert_close(logits, full, atol=2e-4, rtol=0)
    assert cache.get_seq_length() == len(ids)
    assert stats.num_recomputed == NUM_CHUNKS * CHUNK_TOKENS
    assert stats.num_reused == 0
    assert stats.num_chunks_hit == NUM_CHUNKS


@pytest.mark.model
@pytest.mark.slow
def test_build_cache_agrees_on_top1_with_full_prefill_at_default_ratio(quality):
    assert all(per_prompt[0] for per_prompt in quality.agree), quality.agree  # the next token
    positions = sum(quality.agree, [])
    rate = sum(positions) / len(positions)
    assert rate >= 0.95, f"top-1 agreement {rate:.2f} over {len(positions)} answer positions"


@pytest.mark.model
@pytest.mark.slow
def test_build_cache_beats_naive_concatenation_on_kl_to_full_prefill(quality):
    blend = sum(quality.kl_blend) / len(quality.kl_blend)
    query_aware = sum(quality.kl_query_aware) / len(quality.kl_query_aware)
    naive = sum(quality.kl_naive) / len(quality.kl_naive)
    assert blend < 0.5 * naive, f"mean KL blend {blend:.4f} vs naive {naive:.4f}"
    assert query_aware < 0.5 * naive, f"query-aware {query_aware:.4f} vs naive {naive:.4f}"


@pytest.mark.model
@pytest.mark.slow
def test_build_cache_computing_chunks_after_the_prefix_lowers_kl_to_full_prefill(quality):
    after_prefix = sum(quality.kl_blend) / len(quality.kl_blend)
    alone = sum(quality.kl_no_lead) / len(quality.kl_no_lead)
    assert after_prefix < alone, (
        f"mean KL chunks after the prefix {after_prefix:.4f}, alone {alone:.4f}"
    )


@pytest.mark.model
@pytest.mark.slow
def test_build_cache_counts_reused_recomputed_and_prefilled_tokens(daemon):
    from kvstore.models.smollm2 import sample_tokens

    model, tokenizer = smollm2()
    _, chunks, query = _prompt(tokenizer, 0)
    chunks = [c[:40] for c in chunks]  # not stored yet in any namespace
    prefix = sample_tokens(tokenizer, 70, offset=500)  # one full 64-token chunk + 6
    num_chunk_tokens = sum(len(c) for c in chunks)
    with _client(daemon, model) as client:
        _, _, cold = build_cache(model, client, chunks, query, prefix, recompute_ratio=0.15)
        assert all(client.lookup_chunk(stored_chunk_tokens(c, prefix)) for c in chunks)
        assert not any(client.lookup_chunk(c) for c in chunks)  # computed after the prefix
        assert client.lookup(prefix) == 64  # the prefix's full chunk was stored
        _, _, warm = build_cache(
            model, client, chunks[:2], query, prefix=prefix, recompute_ratio=0.25
        )
    assert (cold.num_chunks_hit, cold.num_chunks_encoded) == (0, NUM_CHUNKS)
    assert cold.num_recomputed == round(0.15 * num_chunk_tokens)
    assert cold.num_reused == num_chunk_tokens - cold.num_recomputed
    assert cold.num_prefilled == len(query) + len(prefix)
    assert (warm.num_chunks_hit, warm.num_chunks_encoded) == (2, 0)
    assert warm.num_recomputed == round(0.25 * 2 * 40)
    assert warm.num_reused == 64 + 2 * 40 - warm.num_recomputed
    assert warm.num_prefilled == len(query) + 6


def test_build_cache_equals_full_prefill_for_a_random_llama_at_ratio_one(daemon):
    model = tiny_llama(
        {
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
    )
    gen = torch.Generator().manual_seed(3)
    chunks = [torch.randint(0, 128, (n,), generator=gen).tolist() for n in (20, 33, 17)]
    query = torch.randint(0, 128, (5,), generator=gen).tolist()
    with _client(daemon, model, "float32") as client:
        _, logits, _ = build_cache(
            model, client, chunks, query, prefix=[1, 2, 3], recompute_ratio=1.0
        )
    full = _full(model, [1, 2, 3] + sum(chunks, []) + query, [0])[-1]
    torch.testing.assert_close(logits, full, atol=1e-5, rtol=0)


def test_build_cache_rejects_model_with_unknown_rope_scaling(daemon):
    model = tiny_llama({"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    with _client(daemon, model) as client:
        with pytest.raises(InvalidArgument, match="rope_type 'dynamic'"):
            build_cache(model, client, [[1, 2, 3]], [4, 5])


def test_build_cache_keeps_chunks_computed_after_different_leads_apart(daemon):
    model = tiny_llama()
    chunks, query = [[5, 6, 7, 8], [9, 10, 11]], [12, 13]
    with _client(daemon, model, "float32") as client:
        encoded = [
            build_cache(model, client, chunks, query, prefix=prefix, chunk_lead=lead)[2]
            for prefix, lead in [([1, 2], []), ([1, 2], None), ([1, 2], None), ([3], None)]
        ]
        assert [s.num_chunks_encoded for s in encoded] == [2, 2, 0, 2]
        for lead in ([], [1, 2], [3]):
            assert all(client.lookup_chunk(stored_chunk_tokens(c, lead)) for c in chunks)


@torch.inference_mode()
def test_build_cache_stores_a_chunk_as_computed_after_its_lead_keys_at_position_zero(daemon):
    from kvstore.models.cache import kv_from_cache
    from kvstore.models.rope import rope_spec, rotate_keys

    model = tiny_llama()
    lead, chunk = [1, 2, 3], list(range(20, 45))
    with _client(daemon, model, "float32") as client:
        build_cache(model, client, [chunk], [7], chunk_lead=lead)
        stored = torch.as_tensor(client.get_chunk(stored_chunk_tokens(chunk, lead)))
    out = model(input_ids=torch.tensor([lead + chunk]), use_cache=True)
    want = kv_from_cache(out.cache, len(lead), len(lead + chunk), torch.float32)
    positions = torch.arange(len(lead), len(lead + chunk))
    want[:, 0] = rotate_keys(want[:, 0], rope_spec(model), positions, inverse=True)
    num_tag = stored.shape[3] - len(chunk)
    assert num_tag > 0 and not stored[:, :, :, :num_tag].any()  # zero rows for the lead's tag
    torch.testing.assert_close(stored[:, :, :, num_tag:], want, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"recompute_ratio": 1.5},
        {"chunks": []},
        {"query": []},
        {"chunks": [[1, -2, 3]]},  # negative ids are reserved for the lead tag
        {"chunk_lead": [-1]},
    ],
)
def test_build_cache_rejects_bad_arguments(daemon, kwargs):
    model = tiny_llama()
    args = {"chunks": [[1, 2, 3]], "query": [4, 5], **kwargs}
    with _client(daemon, model) as client:
        with pytest.raises(InvalidArgument):
            build_cache(model, client, **args)
