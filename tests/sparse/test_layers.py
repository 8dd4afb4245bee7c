"""Sparse layer state on synthetic KV: exactness at full budget, budget, hits, sealing, bundles."""

from __future__ import annotations

import pytest
import torch
from kvstore.kernels.sparse_gather import rope_rotate_reference

from kvstore.errors import Corrupt, InvalidArgument
from kvstore.sparse import BlockGeometry, HostBlockPool, ShadowBundle, SparseConfig, build_sequence
from kvstore.sparse.layers import SparseLayer, attend

ROPE = (1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16)), 1.0)
NUM_KV, DIM, SCALE = 2, 16, 16**-0.5


def _sequence(cfg: SparseConfig, n: int = 204, seed: int = 0, rope=ROPE, block_constant=False):
    gen = torch.Generator().manual_seed(seed)
    k_pre = torch.randn(1, NUM_KV, n, DIM, generator=gen)
    values = torch.randn(1, NUM_KV, n, DIM, generator=gen)
    if block_constant:  # every token of a block has its block's first key and value
        # (float16 values, so the float16 landmarks and mean values are exact)
        k_pre = k_pre[:, :, ::8].repeat_interleave(8, dim=2)[:, :, :n].half().float()
        values = values[:, :, ::8].repeat_interleave(8, dim=2)[:, :, :n].half().float()
    pool = HostBlockPool(BlockGeometry(1, NUM_KV, DIM, 8, cfg.store_dtype), n // 8 + 1, pin=False)
    bundle = build_sequence(k_pre, values, cfg, rope, "fp", pool, n // 8 + 8)
    layer = SparseLayer(0, cfg, bundle.layers[0], pool, rope, SCALE, bundle.tail_k_pre[0],
                        bundle.tail_v[0])
    keys = rope_rotate_reference(k_pre[0], torch.arange(n), *rope)
    return layer, bundle, keys, values[0], gen


def _token(gen: torch.Generator, position: int):
    q = torch.randn(2 * NUM_KV, DIM, generator=gen)
    k_pre = torch.randn(NUM_KV, DIM, generator=gen)
    v = torch.randn(NUM_KV, DIM, generator=gen)
    pos = torch.tensor([position])
    return (rope_rotate_reference(q, pos, *ROPE), k_pre,
            rope_rotate_reference(k_pre, pos, *ROPE), v)


@pytest.mark.parametrize("exact_keys", [True, False])
@pytest.mark.parametrize("selector", ["landmark", "lowrank", "two_stage"])
def test_sparse_layer_is_exact_when_budget_covers_everything(selector: str,
                                                            exact_keys: bool) -> None:
    cfg = SparseConfig(budget_tokens=1024, selector=selector, dense_layers=0, rank=32,
                       store_dtype="float32", exact_keys=exact_keys)
    layer, _, keys, values, gen = _sequence(cfg)
    q, k_pre, k_post, v = _token(gen, 204)
    out, stats = layer.step(q, k_pre, k_post, v)
    want = attend(q, torch.cat((keys, k_post[:, None]), 1), torch.cat((values, v[:, None]), 1),
                  SCALE)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    assert stats.num_attended == 205


@pytest.mark.parametrize("summarize", [True, False])
def test_summaries_stand_in_exactly_for_uniform_unselected_blocks(summarize: bool) -> None:
    # Without RoPE and with every block's tokens alike, a block's landmark and mean
    # value are its tokens' key and value: its summary term is exact, so the whole
    # output is, although only 128 of 401 tokens are attended exactly.
    no_rope = (torch.zeros(DIM // 2), 1.0)
    cfg = SparseConfig(budget_tokens=128, dense_layers=0, store_dtype="float32",
                       summarize_unselected=summarize)
    layer, _, keys, values, gen = _sequence(cfg, n=400, rope=no_rope, block_constant=True)
    q, k_pre, _, v = _token(gen, 400)
    out, stats = layer.step(q, k_pre, k_pre, v)
    want = attend(q, torch.cat((keys, k_pre[:, None]), 1), torch.cat((values, v[:, None]), 1),
                  SCALE)
    assert stats.num_attended <= 128
    if summarize:
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    else:
        assert (out - want).norm() / want.norm() > 0.05


def test_sparse_layer_attends_within_budget_and_rehits_resident_blocks() -> None:
    cfg = SparseConfig(budget_tokens=128, dense_layers=0)
    layer, _, _, _, gen = _sequence(cfg, n=400)
    q, k_pre, k_post, v = _token(gen, 400)
    _, first = layer.step(q, k_pre, k_post, v)
    _, again = layer.step(q, *(_token(gen, 401)[1:]))
    assert first.num_attended <= 128 and again.num_attended <= 128
    assert first.num_misses == first.selected.numel() and first.bytes_fetched > 0
    assert again.num_hits >= again.selected.numel() - 2  # same query: nearly all resident


def test_generated_tokens_are_sealed_and_window_stays_bounded() -> None:
    cfg = SparseConfig(budget_tokens=128, dense_layers=0)
    layer, bundle, _, _, gen = _sequence(cfg, n=204)
    blocks_before = layer.shadow.num_blocks
    for i in range(40):
        _, stats = layer.step(*_token(gen, 204 + i))
        assert stats.num_attended <= 128
        assert layer.recent_k.shape[1] <= (cfg.local_blocks + 1) * cfg.block_tokens
    assert layer.shadow.num_blocks == (204 + 40) // 8 > blocks_before


def test_bundle_round_trips_and_rejects_corruption() -> None:
    cfg = SparseConfig(budget_tokens=128, dense_layers=0, rank=8)
    _, bundle, _, _, _ = _sequence(cfg)
    data = bundle.to_bytes()
    back = ShadowBundle.from_bytes(data, capacity_blocks=64)
    assert back.num_tokens == 204 and back.num_blocks == 25 and back.fingerprint == "fp"
    assert torch.equal(back.layers[0].basis, bundle.layers[0].basis)
    assert torch.equal(back.layers[0].outliers, bundle.layers[0].outliers)
    assert torch.equal(back.layers[0].value_means[:, :25], bundle.layers[0].value_means[:, :25])
    assert torch.equal(back.tail_v, bundle.tail_v)
    assert back.layers[0].capacity_blocks == 64
    bad = bytearray(data)
    bad[-5] ^= 1
    with pytest.raises(Corrupt, match="checksum"):
        ShadowBundle.from_bytes(bytes(bad))


def test_outliers_avoid_sink_and_local_window() -> None:
    cfg = SparseConfig(budget_tokens=256, dense_layers=0, outlier_blocks=6)
    _, bundle, _, _, _ = _sequence(cfg, n=200)
    outliers = bundle.layers[0].outliers
    assert outliers.shape == (NUM_KV, 6)
    assert (outliers >= cfg.sink_blocks).all()
    assert (outliers < 25 - cfg.local_blocks).all()


def test_config_rejects_budget_without_room_for_selection() -> None:
    with pytest.raises(InvalidArgument, match="no room"):
        SparseConfig(budget_tokens=64)
    with pytest.raises(InvalidArgument, match="selector"):
        SparseConfig(selector="oracle")
