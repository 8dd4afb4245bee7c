"""Calibration without the user: the table a namespace's chunks get (codec/autocal.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kvstore.client._codec import encode_chunk
from kvstore.codec import autocal
from kvstore.codec.calibrate import make_table, normalise_weights, save_table
from kvstore.codec.kvq import parse_kvq, table_id_of
from kvstore.layout import KVLayout
from kvstore.models import smollm2

from .conftest import synthetic_kv

SMOLLM2 = KVLayout(smollm2.NUM_LAYERS, smollm2.NUM_KV_HEADS, smollm2.HEAD_DIM, "float16", 256)
SMALL = KVLayout(4, 2, 16, "float16", 32)


def test_model_key_drops_org_revision_and_instruct_suffix() -> None:
    for name in ("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct@main",
                 "SmolLM2-135M@rev2"):
        assert autocal.model_key(name) == "smollm2-135m"
    assert autocal.model_key("llama-3-8b@main") == "llama-3-8b"


def test_known_model_gets_the_shipped_table(tmp_path: Path) -> None:
    chooser = autocal.AutoCalibration(data_dir=tmp_path)  # no user tables
    kv = synthetic_kv(30, 3, 256, 64)
    table = chooser.table_for("HuggingFaceTB/SmolLM2-135M-Instruct@main", SMOLLM2, kv)
    shipped = autocal.shipped_tables()
    assert table is not None and table in shipped and table.model == "smollm2-135m"
    # Same name, other geometry: not this model's table.
    other = KVLayout(30, 3, 128, "float16", 256)
    assert chooser.table_for("smollm2-135m", other, synthetic_kv(30, 3, 256, 128)) \
        not in shipped


def test_user_table_wins_and_a_damaged_one_is_skipped(tmp_path: Path) -> None:
    weights = normalise_weights(np.random.default_rng(0).uniform(0.5, 2.0, (30, 192)))
    sens = {"k": [0.01] * 6, "v": [0.01] * 6}
    mine = make_table("SmolLM2-135M", SMOLLM2, 5, sens, weights)
    save_table(mine, tmp_path / "a-mine.json")
    (tmp_path / "z-broken.json").write_text("{not json")
    chooser = autocal.AutoCalibration(data_dir=tmp_path)
    assert chooser.table_for("smollm2-135m@main", SMOLLM2, synthetic_kv(30, 3, 256, 64)) == mine


def test_unknown_model_gets_a_statistics_table_from_its_first_chunk(tmp_path: Path) -> None:
    chooser = autocal.AutoCalibration(data_dir=tmp_path)
    kv = synthetic_kv(4, 2, 32, 16)
    table = chooser.table_for("my-model@main", SMALL, kv)
    assert table is not None and table.model == "stats:my-model"
    # Louder key channels get larger weights (finer steps).
    rms = autocal.key_stats(kv, "float16")
    weights = np.asarray(table.key_weights)
    for layer in range(4):
        assert np.corrcoef(np.log(rms[layer]), np.log(weights[layer]))[0, 1] > 0.99
    assert chooser.table_for("my-model@main", SMALL, synthetic_kv(4, 2, 32, 16, seed=1)) \
        is table  # same statistics: the same table


def test_statistics_table_is_rebuilt_when_key_statistics_drift(tmp_path: Path) -> None:
    chooser = autocal.AutoCalibration(data_dir=tmp_path)
    first = chooser.table_for("m", SMALL, synthetic_kv(4, 2, 32, 16))
    drifted = synthetic_kv(4, 2, 32, 16, seed=2)
    drifted[:, 0] *= np.float16(8.0)  # keys 8x louder: |log ratio| ~ 2
    assert chooser.table_for("m", SMALL, drifted) is first  # one chunk is not a drift
    second = chooser.table_for("m", SMALL, drifted)
    assert second is not None and second is not first
    assert chooser.num_rebuilds("m", SMALL) == 1
    assert chooser.table_for("m", SMALL, drifted) is second


def test_client_encodes_with_the_namespace_table() -> None:
    """The client's encoder (put path) records the table autocal picked."""
    kv = synthetic_kv(30, 3, 256, 64)
    obj = encode_chunk(kv, SMOLLM2, "balanced", 0, "smollm2-135m@main")
    shipped = {t.table_id for t in autocal.shipped_tables()}
    assert table_id_of(parse_kvq(obj)) in shipped
    raw = encode_chunk(kv, SMOLLM2, "raw", 0, "smollm2-135m@main")
    assert len(raw) > len(obj)


def test_statistics_table_refuses_nothing_finite() -> None:
    kv = np.zeros((4, 2, 2, 32, 16), np.float16)  # silent keys: floors keep weights finite
    table = autocal.stats_table("m", SMALL, autocal.key_stats(kv, "float16"))
    assert np.all(np.isfinite(table.key_weights)) and np.all(np.asarray(table.key_weights) > 0)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_key_stats_read_storage_dtypes(dtype: str) -> None:
    import torch

    kv = torch.from_numpy(synthetic_kv(2, 2, 32, 16).astype(np.float32))
    if dtype == "bfloat16":
        storage = kv.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    else:
        storage = kv.numpy()
    want = autocal.key_stats(kv.numpy(), "float32")
    assert np.allclose(autocal.key_stats(storage, dtype), want, rtol=0.02)
