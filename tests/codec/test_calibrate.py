"""Calibration tables: bin allocation, storage, and use by the encoder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kvstore import codec
from kvstore.codec.calibrate import (
    KEY_LADDER,
    allocate_bins,
    load_table,
    main,
    make_table,
    save_table,
)
from kvstore.codec.kvq import parse_kvq, table_id_of
from kvstore.codec.section import parse_section
from kvstore.errors import Corrupt, InvalidArgument, NotFound
from kvstore.layout import KVLayout

from .conftest import synthetic_kv

LAYOUT = KVLayout(num_layers=6, num_kv_heads=2, head_dim=16, chunk_tokens=32)
# SmolLM2-like: middle key groups dominate.
SENS = {"k": [0.0008, 0.02, 0.004], "v": [0.0007, 0.003, 0.001]}


def test_allocation_gives_sensitive_groups_more_bins() -> None:
    bins = allocate_bins(SENS, 0.01, 2, 6)
    assert bins["k"][1] > bins["k"][2] > bins["k"][0]
    assert bins["v"][1] >= bins["v"][0]


def test_allocation_bins_grow_as_the_target_tightens() -> None:
    loose, tight = allocate_bins(SENS, 0.03, 2, 6), allocate_bins(SENS, 0.001, 2, 6)
    for kv in "kv":
        assert all(t >= lo for t, lo in zip(tight[kv], loose[kv], strict=True))
    assert allocate_bins(SENS, 1e-9, 2, 6)["k"] == [KEY_LADDER[-1]] * 3


def test_table_round_trips_through_its_file(tmp_path: Path) -> None:
    table = make_table("toy", LAYOUT, 2, SENS)
    path = save_table(table, tmp_path / "t.json")
    assert load_table(path) == table


def test_tampered_table_file_raises_corrupt(tmp_path: Path) -> None:
    path = save_table(make_table("toy", LAYOUT, 2, SENS), tmp_path / "t.json")
    path.write_text(path.read_text().replace('"k": [', '"k": [3, ', 1))
    with pytest.raises(Corrupt):
        load_table(path)
    with pytest.raises(NotFound):
        load_table("00000000deadbeef")


def test_encoder_uses_table_bins_and_records_its_id() -> None:
    table = make_table("toy", LAYOUT, 2, SENS)
    kv = synthetic_kv(6, 2, 32, 16)
    data = codec.encode(kv, LAYOUT, "balanced", table=table)
    obj = parse_kvq(data)
    assert table_id_of(obj) == table.table_id
    for i, buf in enumerate(obj.sections):
        layer, kv_index = divmod(i, 2)
        view = parse_section(buf, kv_index, 2, 32, 16)
        assert view.num_symbols == table.bins("balanced", layer, kv_index)
    assert codec.decode(data).shape == kv.shape  # decoding needs no table
    with pytest.raises(InvalidArgument):
        codec.encode(synthetic_kv(4, 2, 32, 16), KVLayout(4, 2, 16, chunk_tokens=32),
                     "balanced", table=table)


@pytest.mark.model
@pytest.mark.slow
def test_calibrate_command_writes_a_loadable_table(tmp_path: Path) -> None:
    out = tmp_path / "smollm2.json"
    assert main(["--prefix-tokens", "256", "--eval-tokens", "64", "--group-layers", "10",
                 "--out", str(out)]) == 0
    table = load_table(out)
    assert table.num_layers == 30 and len(table.sensitivity["k"]) == 3
    assert all(np.isfinite(table.sensitivity["k"]))
