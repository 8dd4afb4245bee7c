"""The same-host path end to end: a real daemon on port 0, clients mapping its arena."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import xxhash

from kvstore.client import Client
from kvstore.errors import Corrupt, PermissionDenied
from kvstore.server.app import ServerThread
from kvstore.server.local import is_loopback_peer
from tests.conftest import make_config, make_kv, make_tokens

ROOT = Path(__file__).resolve().parent.parent


def _sent_bytes(server: ServerThread) -> int:
    return server.counters.sent_bytes


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_arena_and_stream_paths_return_identical_tensors(client, layout, dtype):
    lay = dataclasses.replace(layout, dtype=dtype)
    tokens, kv = make_tokens(64), make_kv(lay, 64)
    assert client(f"same-{dtype}", lay).put(tokens, kv) == 64
    arena = client(f"same-{dtype}", lay, transport="arena")
    stream = client(f"same-{dtype}", lay, transport="stream")
    for layers in (None, [0, 2]):
        a = arena.get(tokens, layers=layers, as_numpy=True)
        s = stream.get(tokens, layers=layers, as_numpy=True)
        assert a.dtype == s.dtype and a.shape == s.shape
        assert a.tobytes() == s.tobytes()
    assert np.array_equal(arena.get(tokens, as_numpy=True), kv)
    assert arena.get(make_tokens(64, seed=5)) is None
    rag = make_tokens(7, seed=3)
    arena.put_chunk(rag, make_kv(lay, 7, seed=3))
    assert arena.get_chunk(rag, as_numpy=True).tobytes() == stream.get_chunk(
        rag, as_numpy=True).tobytes()


def test_auto_transport_reads_arena_without_streaming_bytes(client, layout, server):
    tokens, kv = make_tokens(64), make_kv(layout, 64)
    c = client()
    c.put(tokens, kv)
    before = _sent_bytes(server)
    assert np.array_equal(c.get(tokens, as_numpy=True), kv)
    assert _sent_bytes(server) == before  # no Get bytes crossed the socket
    assert server.engine.dram.stats().info["leases"] == "0"  # released after the copy


def test_second_process_reads_arena_bit_exact(client, layout, server):
    tokens, kv = make_tokens(64), make_kv(layout, 64)
    client().put(tokens, kv)
    script = (
        "import sys, xxhash, numpy as np\n"
        "from kvstore.client import Client\n"
        "from tests.conftest import SMALL_LAYOUT, make_tokens\n"
        f"c = Client({server.address!r}, 'model@rev', SMALL_LAYOUT, transport='arena')\n"
        "print(xxhash.xxh64(c.get(make_tokens(64), as_numpy=True).tobytes()).hexdigest())\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=ROOT, check=True, timeout=60).stdout.strip()
    assert out == xxhash.xxh64(kv.tobytes()).hexdigest()


def test_killed_client_holding_lease_pins_nothing_after_ttl(tmp_path, layout):
    chunk = layout.chunk_bytes + 1024  # room for one object
    config = make_config(tmp_path / "data", **{"tiers.cpu.capacity_bytes": 4 * chunk,
                                               "tiers.cpu.lease_ttl_s": 1.0})
    with ServerThread(config) as server:
        tokens, kv = make_tokens(64), make_kv(layout, 64)
        Client(server.address, "m", layout).put(tokens, kv)
        script = (
            "import sys, time\n"
            "from kvstore.client import Client\n"
            "from tests.conftest import SMALL_LAYOUT, make_tokens\n"
            f"c = Client({server.address!r}, 'm', SMALL_LAYOUT, transport='arena')\n"
            "lease = c.lease(make_tokens(64))\n"
            "print(len(lease.extents), flush=True)\n"
            "time.sleep(600)\n"
        )
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                                text=True, cwd=ROOT)
        try:
            assert proc.stdout.readline().strip() == "4"
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        dram = server.engine.dram
        pinned = set(dram.keys())
        other = Client(server.address, "other", layout)
        other.put(make_tokens(16, seed=7), make_kv(layout, 16, seed=7))  # to disk: DRAM pinned
        assert set(dram.keys()) == pinned
        time.sleep(1.2)  # the dead client's lease expires
        other.put(make_tokens(32, seed=8), make_kv(layout, 32, seed=8))
        assert dram.stats().info["leases"] == "0"
        assert len(pinned - set(dram.keys())) == 2  # two of them made room


def test_lease_blocks_eviction_of_exactly_its_chunks(tmp_path, layout):
    chunk = layout.chunk_bytes + 1024
    config = make_config(tmp_path / "data", **{"tiers.cpu.capacity_bytes": 4 * chunk})
    with ServerThread(config) as server:
        c = Client(server.address, "m", layout, transport="arena")
        tokens, kv = make_tokens(64), make_kv(layout, 64)
        c.put(tokens, kv)
        dram = server.engine.dram
        leased_keys, lease_free = dram.keys()[:2], dram.keys()[2:]
        with c.lease(tokens[:32]) as lease:
            assert len(lease.extents) == 2 and lease.num_chunks_stored == 2
            c.put(make_tokens(32, seed=9), make_kv(layout, 32, seed=9))  # evicts 2 chunks
            held = set(dram.keys())
            # Chunks 0 and 1 are least recent, but leased: exactly 2 and 3 made room.
            assert set(leased_keys) <= held and not held & set(lease_free)
        assert np.array_equal(c.get(tokens, as_numpy=True), kv)  # evicted ones from disk


def test_arena_get_promotes_chunks_found_on_disk(client, layout, server):
    tokens, kv = make_tokens(64), make_kv(layout, 64)
    c = client(transport="arena")
    c.put(tokens, kv)
    server.engine.flush()
    for key in server.engine.dram.keys():
        server.engine.dram.delete(key)  # now only the disk holds them
    with c.lease(tokens) as lease:
        assert len(lease.extents) == 4 and lease.num_chunks_stored == 4
    assert np.array_equal(c.get(tokens, as_numpy=True), kv)


def test_arena_get_streams_when_dram_cannot_pin_every_chunk(tmp_path, layout):
    chunk = layout.chunk_bytes + 1024
    config = make_config(tmp_path / "data", **{"tiers.cpu.capacity_bytes": 2 * chunk})
    with ServerThread(config) as server:
        c = Client(server.address, "m", layout)
        tokens, kv = make_tokens(64), make_kv(layout, 64)
        c.put(tokens, kv)
        server.engine.flush()
        with c.lease(tokens) as lease:
            assert (len(lease.extents), lease.num_chunks_stored) == (2, 4)
        assert np.array_equal(c.get(tokens, as_numpy=True), kv)


def test_corrupt_arena_bytes_are_never_returned(client, layout, server):
    tokens, kv = make_tokens(32), make_kv(layout, 32)
    client().put(tokens, kv)
    with client().lease(tokens) as lease:
        extent = lease.extents[1]
    arena = server.engine.dram._arena  # flip one KV byte of chunk 1 in DRAM
    arena._view[extent.offset + extent.length - 7] ^= 0x10
    with pytest.raises(Corrupt):
        client(transport="arena").get(tokens, as_numpy=True)
    # Falls back to Get: DRAM's bad copy of chunk 1 is dropped, and chunk 1 comes back
    # good from the disk if write-back already put it there, else the get stops before it.
    back = client().get(tokens, as_numpy=True)
    assert back is None or np.array_equal(back, kv[:, :, :, : back.shape[3]])


def test_tenants_get_streamed_path_unless_allowed(tmp_path, layout):
    tokens, kv = make_tokens(32), make_kv(layout, 32)
    for allowed in (False, True):
        config = make_config(tmp_path / f"d{allowed}", **{
            "server.tokens": {"secret": "acme"}, "server.arena_for_tenants": allowed})
        with ServerThread(config) as server:
            before = server.counters.sent_bytes
            auto = Client(server.address, "m", layout, token="secret")
            auto.put(tokens, kv)
            assert np.array_equal(auto.get(tokens, as_numpy=True), kv)
            assert (server.counters.sent_bytes == before) is allowed
            forced = Client(server.address, "m", layout, token="secret", transport="arena")
            if allowed:
                assert np.array_equal(forced.get(tokens, as_numpy=True), kv)
            else:
                with pytest.raises(PermissionDenied, match="arena_for_tenants"):
                    forced.get(tokens)


def test_only_loopback_peers_may_map_the_arena():
    assert is_loopback_peer("ipv4:127.0.0.1:5000") and is_loopback_peer("ipv6:[::1]:5000")
    assert is_loopback_peer("unix:/tmp/kvstore.sock")
    assert not is_loopback_peer("ipv4:10.0.0.2:5000")
    assert not is_loopback_peer("ipv6:[2001:db8::1]:5000")


def test_eviction_racing_arena_reads_never_returns_torn_data(tmp_path, layout):
    chunk = layout.chunk_bytes + 1024
    config = make_config(tmp_path / "data", **{"tiers.cpu.capacity_bytes": 6 * chunk})
    with ServerThread(config) as server:
        tokens, kv = make_tokens(48), make_kv(layout, 48)
        Client(server.address, "m", layout).put(tokens, kv)
        stop, wrong = threading.Event(), []

        def churn() -> None:
            writer, seed = Client(server.address, "churn", layout), 100
            while not stop.is_set():
                writer.put(make_tokens(32, seed=seed), make_kv(layout, 32, seed=seed))
                seed += 1

        thread = threading.Thread(target=churn)
        thread.start()
        try:
            reader = Client(server.address, "m", layout, transport="arena")
            for _ in range(40):
                back = reader.get(tokens, as_numpy=True)
                if back is not None and not np.array_equal(back, kv[:, :, :, :back.shape[3]]):
                    wrong.append(back.shape)
        finally:
            stop.set()
            thread.join()
        assert wrong == []


def test_arena_gets_count_as_dram_hits_in_stats_and_metrics(tmp_path, layout):
    import urllib.request

    from kvstore.client import fetch_stats

    config = make_config(tmp_path / "data", **{"server.metrics_listen": "127.0.0.1:0"})
    tokens, kv = make_tokens(64), make_kv(layout, 64)
    with ServerThread(config) as server, Client(server.address, "m", layout,
                                                transport="arena") as c:
        c.put(tokens, kv)
        for _ in range(3):
            assert np.array_equal(c.get(tokens, as_numpy=True), kv)
        cpu = next(t for t in fetch_stats(server.address)["tiers"] if t["name"] == "cpu")
        assert cpu["hits"] == 3 * 4  # 3 gets of 4 chunks, all read from the arena
        assert cpu["read_bytes"] > 0
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        assert 'kvstore_tier_hits_total{tier="cpu"} 12.0' in text
