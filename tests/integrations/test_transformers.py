"""Prefix reuse for HF transformers against a real daemon on port 0: exactness, partial hits."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from kvstore.errors import InvalidArgument
from kvstore.integrations.transformers import generate, layout_for, prefill
from tests.conftest import make_config
from tests.models import smollm2, tiny_llama

_names = itertools.count()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from kvstore.server.app import ServerThread

    config = make_config(
        tmp_path_factory.mktemp("kvstore"), **{"tiers.cpu.capacity_bytes": 256 << 20}
    )
    with ServerThread(config) as server:
        yield server


def _client(daemon: Any, model: Any, dtype: str = "float32", chunk_tokens: int = 64) -> Any:
    from kvstore import Client

    # A fresh namespace per test keeps the tests independent on one daemon.
    return Client(daemon.address, f"test-{next(_names)}", layout_for(model, dtype, chunk_tokens))


@torch.inference_mode()
def _full_logits(model: Any, ids: list[int]) -> torch.Tensor:
    return model(input_ids=torch.tensor([ids]), logits_to_keep=1).logits[0, -1].float()


@pytest.fixture(scope="module")
def model_and_ids() -> tuple[Any, list[int]]:
    from kvstore.models.smollm2 import sample_tokens

    model, tokenizer = smollm2()
    return model, sample_tokens(tokenizer, 200, offset=1000)


@pytest.mark.model
@pytest.mark.slow
def test_prefill_matches_full_prefill_when_prefix_fully_stored(daemon, model_and_ids):
    model, ids = model_and_ids
    ids = ids[:192]
    with _client(daemon, model, "float32") as client:
        _, first, num_first = prefill(model, ids, client)
        cache, logits, num_reused = prefill(model, ids, client)
    full = _full_logits(model, ids)
    assert num_first == 0
    assert num_reused == 191  # every token stored; the last one runs for its logits
    assert cache.get_seq_length() == 192
    torch.testing.assert_close(logits, full, atol=2e-4, rtol=0)
    torch.testing.assert_close(first, full, atol=2e-4, rtol=0)


@pytest.mark.model
@pytest.mark.slow
def test_prefill_reuses_exactly_the_stored_chunks_when_prefix_partly_stored(daemon, model_and_ids):
    model, ids = model_and_ids
    with _client(daemon, model, "float32") as client:
        prefill(model, ids[:150], client)  # stores 2 chunks of 64
        assert client.lookup(ids) == 128
        cache, logits, num_reused = prefill(model, ids, client)
        assert num_reused == 128
        assert client.lookup(ids) == 192  # the new full chunks were stored
    assert cache.get_seq_length() == len(ids)
    torch.testing.assert_close(logits, _full_logits(model, ids), atol=2e-4, rtol=0)


@pytest.mark.model
@pytest.mark.slow
def test_prefill_keeps_top1_when_stored_as_float16(daemon, model_and_ids):
    model, ids = model_and_ids
    with _client(daemon, model, "float16") as client:
        prefill(model, ids, client)
        _, logits, num_reused = prefill(model, ids, client)
    full = _full_logits(model, ids)
    assert num_reused == 192
    assert logits.argmax() == full.argmax()
    assert (logits - full).abs().max() < 0.05


@pytest.mark.model
@pytest.mark.slow
def test_generate_matches_plain_generate_when_prefix_stored(daemon, model_and_ids):
    model, ids = model_and_ids
    prompt = ids[:140]
    with _client(daemon, model, "float32") as client:
        prefill(model, prompt, client)
        out = generate(model, prompt, client, max_new_tokens=4, do_sample=False)
    with torch.inference_mode():
        plain = model.generate(torch.tensor([prompt]), max_new_tokens=4, do_sample=False)
    assert torch.equal(out, plain)


def test_prefill_rejects_client_layout_of_another_model(daemon):
    from kvstore import Client
    from kvstore.layout import KVLayout

    model = tiny_llama()
    wrong = KVLayout(num_layers=30, num_kv_heads=3, head_dim=64, dtype="float16", chunk_tokens=16)
    with Client(daemon.address, "tiny-wrong", wrong) as client:
        with pytest.raises(InvalidArgument, match="layout"):
            prefill(model, list(range(40)), client)


def test_prefill_reuses_stored_chunks_for_a_random_llama(daemon):
    model = tiny_llama()
    ids = [int(t) for t in torch.randint(0, 128, (70,), generator=torch.Generator().manual_seed(1))]
    with _client(daemon, model, "float32", chunk_tokens=16) as client:
        prefill(model, ids, client)
        _, logits, num_reused = prefill(model, ids, client)
    assert num_reused == 64
    torch.testing.assert_close(logits, _full_logits(model, ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_in_place_load_equals_the_get_path_and_streams_nothing(daemon, dtype):
    from kvstore import Client
    from kvstore.integrations.transformers import load_prefix

    model = tiny_llama()
    ids = [int(t) for t in torch.randint(0, 128, (70,), generator=torch.Generator().manual_seed(3))]
    layout = layout_for(model, dtype, 16)
    name = f"in-place-{next(_names)}"
    with Client(daemon.address, name, layout) as near, \
            Client(daemon.address, name, layout, transport="stream") as far:
        prefill(model, ids, near)
        sent = daemon.counters.sent_bytes
        cache, num_reused, num_stored = load_prefix(model, near, ids)
        assert daemon.counters.sent_bytes == sent  # read in the arena, not streamed
        streamed, num_reused_far, _ = load_prefix(model, far, ids)
        assert daemon.counters.sent_bytes > sent
    assert (num_reused, num_stored, num_reused_far) == (64, 64, 64)
    for mine, theirs in zip(cache.layers, streamed.layers, strict=True):
        assert mine.keys.dtype == torch.float32
        assert torch.equal(mine.keys, theirs.keys) and torch.equal(mine.values, theirs.values)


def test_in_place_load_falls_back_to_get_for_compressed_chunks(daemon):
    from kvstore import Client
    from kvstore.integrations.transformers import load_prefix

    model = tiny_llama()
    ids = [int(t) for t in torch.randint(0, 128, (40,), generator=torch.Generator().manual_seed(4))]
    with Client(daemon.address, f"kvq-{next(_names)}", layout_for(model, "float16", 16),
                codec="balanced") as client:
        prefill(model, ids, client)
        with pytest.raises(InvalidArgument, match="compressed"):
            client.view(ids[:32])
        cache, num_reused, _ = load_prefix(model, client, ids)
    assert num_reused == 32 and cache.get_seq_length() == 32


def test_in_place_load_reuses_its_buffer_only_once_no_cache_views_it(daemon):
    from kvstore import Client
    from kvstore.integrations.transformers import load_prefix

    model = tiny_llama()
    ids = [int(t) for t in torch.randint(0, 128, (50,), generator=torch.Generator().manual_seed(5))]
    with Client(daemon.address, f"reuse-{next(_names)}", layout_for(model, "float16", 16)) as c:
        prefill(model, ids, c)
        first, _, _ = load_prefix(model, c, ids)
        kept = first.layers[1].keys.clone()
        second, _, _ = load_prefix(model, c, ids)  # `first` still views its buffer
        assert first.layers[1].keys.data_ptr() != second.layers[1].keys.data_ptr()
        assert torch.equal(first.layers[1].keys, kept)
        ptr = second.layers[0].keys.data_ptr()
        del first, second
        third, _, _ = load_prefix(model, c, ids)  # nothing views the buffer now: reused
        assert third.layers[0].keys.data_ptr() == ptr
        with torch.inference_mode():  # a forward replaces the views: the buffer is free
            model(input_ids=torch.tensor([ids[48:]]), cache=third, use_cache=True)
        fourth, _, _ = load_prefix(model, c, ids)
        assert fourth.layers[0].keys.data_ptr() == ptr
        assert torch.equal(fourth.layers[1].keys, kept)
