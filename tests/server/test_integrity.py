"""Daemon integrity under faults: corrupt DRAM beside good disk copies, tenant-private
Stats (issue #17 item 7)."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np

from kvstore.client import Client
from kvstore.codec.format import HEADER_BYTES, MAGIC
from kvstore.server.app import ServerThread
from tests.conftest import make_config, make_kv, make_tokens


def _corrupt_every_arena_object(arena_path: str) -> int:
    """Flip one payload byte of every KVC1 object in the daemon's arena file."""
    fd = os.open(arena_path, os.O_RDWR)
    try:
        with mmap.mmap(fd, 0) as arena:
            num = 0
            at = arena.find(MAGIC, 4096)
            while at >= 0:
                if at % 64 == 0:  # objects start on 64-byte boundaries
                    arena[at + HEADER_BYTES + 200] ^= 0xFF
                    num += 1
                at = arena.find(MAGIC, at + 64)
            return num
    finally:
        os.close(fd)


def test_corrupt_dram_copies_served_from_disk_copies(tmp_path: Path, layout) -> None:
    config = make_config(tmp_path / "d", **{"engine.write_policy": "write-through"})
    tokens, kv = make_tokens(48), make_kv(layout, 48)
    with ServerThread(config) as srv, Client(srv.address, "m", layout,
                                             transport="stream") as c:
        assert c.put(tokens, kv) == 48
        arena = next(t for t in c.stats()["tiers"] if t["name"] == "cpu")["info"]["arena"]
        assert _corrupt_every_arena_object(arena) == 3
        back = c.get(tokens, as_numpy=True)
        assert back is not None and np.array_equal(back, kv)  # read again from the disk
        assert len(list((tmp_path / "d").rglob("*.kvc"))) == 3  # the disk copies stayed
        assert np.array_equal(c.get(tokens, as_numpy=True), kv)  # DRAM holds good copies now


def test_stats_shows_a_tenant_no_other_tenants_figures(tmp_path: Path, layout) -> None:
    tokens_cfg = {"server.tokens": {"tok-a": "alice", "tok-b": "bob"}}
    with ServerThread(make_config(tmp_path / "d", **tokens_cfg)) as srv:
        with Client(srv.address, "m", layout, token="tok-a") as alice, \
                Client(srv.address, "m", layout, token="tok-b") as bob:
            assert alice.put(make_tokens(64), make_kv(layout, 64)) == 64
            assert alice.get(make_tokens(64), as_numpy=True) is not None
            seen = bob.stats()
    assert seen["requests"] == seen["failed_requests"] == 0
    for tier in seen["tiers"]:
        figures = {k: v for k, v in tier.items() if k not in ("name", "capacity_bytes", "info")}
        assert not any(figures.values()), (tier["name"], figures)
        assert tier["capacity_bytes"] > 0
        assert set(tier["info"]) <= {"io", "fsync", "hugepages", "mode", "state"}
