"""A real daemon process under faults: kill -9 during a burst of write-back puts, a
full disk under write-through, a truncated arena under a mapped client (issue #17)."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from kvstore.client import Client
from kvstore.errors import CapacityExhausted, KVStoreError
from kvstore.layout import KVLayout
from tests.conftest import make_kv, make_tokens
from tests.daemon_proc import DaemonProcess
from tests.small_fs import small_filesystem

pytestmark = pytest.mark.slow

INTERVAL_S = 1.0  # the README's engine.flush_interval_s


def _burst(address: str, layout: KVLayout, seconds: float, num_threads: int = 4
           ) -> dict[int, float]:
    """Put distinct 64-token sequences from ``num_threads`` clients for ``seconds``;
    seed -> time.monotonic() of each acknowledged put."""
    acked: dict[int, float] = {}
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def writer(offset: int) -> None:
        with Client(address, "m", layout, timeout_s=10) as c:
            seed = offset
            while time.monotonic() < stop_at:
                tokens, kv = make_tokens(64, seed=seed), make_kv(layout, 64, seed=seed)
                try:
                    assert c.put(tokens, kv) == 64
                except KVStoreError:
                    return
                with lock:
                    acked[seed] = time.monotonic()
                seed += num_threads

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(num_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return acked


def test_kill_9_loses_only_puts_younger_than_flush_interval(tmp_path, layout):
    # Issue #17 item 4: write-back with fsync'd files (a few ms each) is slower than
    # four clients' puts; the oldest acknowledged put lost to kill -9 must be younger
    # than engine.flush_interval_s.
    data = tmp_path / "data"
    toml = (f"[engine]\nwrite_policy = 'write-back'\nflush_interval_s = {INTERVAL_S}\n"
            "[tiers.disk]\nfsync = true\n[tiers.cpu]\ncapacity_bytes = 268435456\n")
    daemon = DaemonProcess(tmp_path, data, toml)
    burst: dict[int, float] = {}
    thread = threading.Thread(target=lambda: burst.update(_burst(daemon.address, layout, 60)))
    thread.start()
    time.sleep(4.0)
    killed_at = time.monotonic()
    daemon.stop(signal.SIGKILL)
    thread.join(timeout=60)
    acked = {seed: at for seed, at in burst.items() if at <= killed_at}
    assert len(acked) > 20, "the burst was too small to test anything"
    daemon = DaemonProcess(tmp_path, data, toml)
    try:
        with Client(daemon.address, "m", layout) as c:
            lost = [seed for seed in acked if c.lookup(make_tokens(64, seed=seed)) < 64]
    finally:
        daemon.stop()
    oldest_lost_s = max((killed_at - acked[seed] for seed in lost), default=0.0)
    assert oldest_lost_s <= INTERVAL_S, (
        f"{len(lost)} of {len(acked)} acknowledged puts lost, the oldest {oldest_lost_s:.2f} s "
        f"before the kill")


def test_write_through_on_full_disk_evicts_or_refuses_never_drops(tmp_path, layout):
    # Issue #17 item 5: the disk tier's capacity (64 MiB) exceeds its 4 MiB file
    # system. Every acknowledged put must be on disk when acknowledged: the newest
    # ones survive kill -9 (older ones were evicted to make room, which is counted),
    # and an object the file system cannot hold at all fails with RESOURCE_EXHAUSTED.
    toml = ("[engine]\nwrite_policy = 'write-through'\n"
            "[tiers.disk]\nfsync = true\ncapacity_bytes = 67108864\n")
    with small_filesystem(tmp_path / "fs", size_mib=4) as mount:
        data = mount / "data"
        daemon = DaemonProcess(tmp_path, data, toml)
        try:
            with Client(daemon.address, "m", layout) as c:
                for seed in range(60):  # 60 x 196 KiB into 4 MiB
                    assert c.put(make_tokens(64, seed=seed), make_kv(layout, 64, seed=seed)) == 64
            huge = KVLayout(num_layers=64, num_kv_heads=4, head_dim=64, chunk_tokens=64)
            with Client(daemon.address, "huge", huge) as c:  # one 4 MiB chunk: never fits
                with pytest.raises(CapacityExhausted):
                    c.put(make_tokens(64, seed=99), make_kv(huge, 64, seed=99))
                assert c.lookup(make_tokens(64, seed=99)) == 0  # not kept in DRAM alone
        finally:
            daemon.stop(signal.SIGKILL)
        daemon = DaemonProcess(tmp_path, data, toml)
        try:
            with Client(daemon.address, "m", layout) as c:
                for seed in range(55, 60):  # ~1 MiB of the newest puts
                    back = c.get(make_tokens(64, seed=seed), as_numpy=True)
                    assert back is not None, f"acknowledged put {seed} is gone"
                    assert np.array_equal(back, make_kv(layout, 64, seed=seed))
                disk = next(t for t in c.stats()["tiers"] if t["name"] == "disk")
        finally:
            daemon.stop()
    assert disk["num_objects"] >= 5 * 4


_CLIENT = """
import sys
from kvstore.client import Client
from kvstore.errors import Corrupt
from kvstore.layout import KVLayout
from tests.conftest import make_kv, make_tokens

layout = KVLayout(num_layers=4, num_kv_heads=3, head_dim=64, dtype="float16", chunk_tokens=16)
tokens, kv = make_tokens(64), make_kv(layout, 64)
with Client(sys.argv[1], "m", layout, transport="arena") as c:
    c.put(tokens, kv)
    assert (c.get(tokens, as_numpy=True) == kv).all()  # maps the arena
    arena = next(t for t in c.stats()["tiers"] if t["name"] == "cpu")["info"]["arena"]
    print(arena, flush=True)
    sys.stdin.readline()  # the test truncates the arena file now
    try:
        c.get(tokens, as_numpy=True)
        print("read", flush=True)
    except Corrupt as exc:
        print("corrupt:", exc, flush=True)
"""


def test_truncated_arena_is_an_error_not_sigbus_in_mapped_client(tmp_path):
    # Issue #17 item 7: a client that mapped the arena must not die of SIGBUS when the
    # file shrinks under it; it gets a clean error (transport="auto" would stream).
    daemon = DaemonProcess(tmp_path, tmp_path / "data", "[tiers.cpu]\n"
                           "capacity_bytes = 16777216\n")
    try:
        client = subprocess.Popen([sys.executable, "-c", _CLIENT, daemon.address],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                  cwd=Path(__file__).resolve().parents[1])
        arena = client.stdout.readline().strip()
        assert arena, "the client did not map the arena"
        with open(arena, "r+b") as fh:
            fh.truncate(4096)  # only the header page is left
        out, _ = client.communicate("go\n", timeout=60)
    finally:
        daemon.stop(signal.SIGKILL)
    assert client.returncode == 0, f"client died with {client.returncode}: {out}"
    assert out.startswith("corrupt:") and "truncated" in out, out
