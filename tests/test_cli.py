"""The `kvstore` command against a real daemon: stats table, put/get via safetensors."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from kvstore.cli import build_parser, main
from kvstore.codec.calibrate import load_table
from kvstore.stats_table import human_bytes
from tests.conftest import make_kv, make_tokens


def test_stats_prints_a_table_of_tiers(server, capsys):
    assert main(["stats", "--address", server.address]) == 0
    out = capsys.readouterr().out
    for word in ("tier", "used / capacity", "cpu", "disk", "evictions", "corrupt", "GiB"):
        assert word in out


def test_stats_json_is_machine_readable(server, capsys):
    assert main(["stats", "--address", server.address, "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert [t["name"] for t in stats["tiers"]][:2] == ["cpu", "disk"]


def test_stats_of_unreachable_daemon_exits_2(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    assert main(["stats", "--address", dead, "--timeout", "5"]) == 2
    assert "Unavailable" in capsys.readouterr().err


def test_put_then_get_round_trips_through_safetensors(server, layout, tmp_path, capsys):
    tokens = torch.from_numpy(make_tokens(40))
    kv = torch.from_numpy(make_kv(layout, 40)).to(torch.float32).to(torch.bfloat16)
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file({"tokens": tokens, "kv": kv}, src)
    common = ["--address", server.address, "--namespace", "cli", "--chunk-tokens", "16"]
    assert main(["put", *common, "--file", str(src)]) == 0
    assert "stored 32 of 40 tokens" in capsys.readouterr().out
    assert main(["get", *common, "--file", str(src), "--out", str(out)]) == 0
    back = load_file(out)
    assert torch.equal(back["tokens"], tokens[:32])
    assert torch.equal(back["kv"].view(torch.int16), kv[:, :, :, :32].view(torch.int16))
    tokens_only = tmp_path / "tokens.safetensors"
    save_file({"tokens": tokens}, tokens_only)
    layout_flags = ["--num-layers", "4", "--num-kv-heads", "3", "--head-dim", "64",
                    "--dtype", "bfloat16"]
    assert main(["get", *common, "--file", str(tokens_only), "--out", str(out),
                 *layout_flags]) == 0
    assert main(["get", *common, "--file", str(tokens_only), "--out", str(out)]) == 2
    assert "--num-layers" in capsys.readouterr().err


def test_put_shorter_than_a_chunk_says_why_nothing_was_stored(server, layout, tmp_path,
                                                              capsys, caplog):
    import logging

    caplog.set_level(logging.DEBUG, logger="kvstore.client")
    src = tmp_path / "short.safetensors"
    save_file({"tokens": torch.from_numpy(make_tokens(10)),
               "kv": torch.from_numpy(make_kv(layout, 10))}, src)
    assert main(["put", "--address", server.address, "--namespace", "cli", "--chunk-tokens",
                 "16", "--file", str(src)]) == 0
    captured = capsys.readouterr()
    assert "stored 0 of 10 tokens" in captured.out
    assert "the last 10 tokens are not stored: only whole 16-token chunks" in captured.err
    assert [r.getMessage() for r in caplog.records if "stores nothing" in r.getMessage()] == [
        "put of 10 tokens stores nothing: shorter than one 16-token chunk"]


def test_serve_refuses_non_loopback_bind(tmp_path, capsys):
    code = main(["serve", "--listen", "0.0.0.0:0", "--data-dir", str(tmp_path)])
    assert code == 2 and "allow_insecure_remote" in capsys.readouterr().err


def test_parser_has_every_subcommand():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert {"serve", "stats", "put", "get"} <= set(sub.choices)
    assert human_bytes(3 << 30) == "3.0 GiB" and human_bytes(12) == "12 B"


@pytest.mark.model
@pytest.mark.slow
def test_calibrate_command_writes_a_loadable_table(tmp_path: Path, capsys) -> None:
    out = tmp_path / "smollm2.json"
    assert main(["calibrate", "--prefix-tokens", "256", "--eval-tokens", "64",
                 "--group-layers", "10", "--offset", "60000", "--out", str(out)]) == 0
    table = load_table(out)
    assert table.num_layers == 30 and len(table.sensitivity["k"]) == 3
    assert all(np.isfinite(table.sensitivity["k"]))
    weights = np.asarray(table.key_weights)
    assert weights.shape == (30, 192) and np.all(weights > 0)
    assert f"{table.table_id:016x} written to {out}" in capsys.readouterr().out
