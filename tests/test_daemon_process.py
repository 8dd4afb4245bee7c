"""A real `python -m kvstore serve` process: restart after SIGTERM, and after kill -9."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from kvstore.client import Client, fetch_stats
from kvstore.errors import KVStoreError
from tests.conftest import make_kv, make_tokens
from tests.daemon_proc import DaemonProcess

pytestmark = pytest.mark.slow


class Daemon(DaemonProcess):
    """`python -m kvstore serve` on a free loopback port, data in ``data_dir``."""

    def __init__(self, tmp: Path, data_dir: Path) -> None:
        super().__init__(tmp, data_dir, "[engine]\nflush_interval_s = 0.1\n"
                                        "[server]\ndrain_timeout_s = 2.0\n")


def test_restart_after_sigterm_serves_everything_put(tmp_path, layout):
    data = tmp_path / "data"
    seqs = [(make_tokens(48, seed=i), make_kv(layout, 48, seed=i)) for i in range(10)]
    daemon = Daemon(tmp_path, data)
    with Client(daemon.address, "m", layout) as c:
        for tokens, kv in seqs:
            assert c.put(tokens, kv) == 48
    assert daemon.stop(signal.SIGTERM) == 0  # drains and flushes DRAM to disk
    daemon = Daemon(tmp_path, data)
    try:
        with Client(daemon.address, "m", layout) as c:
            for tokens, kv in seqs:
                assert np.array_equal(c.get(tokens, as_numpy=True), kv)
    finally:
        daemon.stop()


def test_reads_after_kill_9_are_exact_or_misses(tmp_path, layout):
    data = tmp_path / "data"
    daemon = Daemon(tmp_path, data)
    attempted: list[tuple[np.ndarray, np.ndarray]] = []
    stop = threading.Event()

    def writer() -> None:
        with Client(daemon.address, "m", layout, timeout_s=5) as c:
            for i in range(100_000):
                if stop.is_set():
                    return
                tokens, kv = make_tokens(64, seed=i), make_kv(layout, 64, seed=i)
                attempted.append((tokens, kv))
                try:
                    c.put(tokens, kv)
                except KVStoreError:
                    return  # the daemon is gone

    thread = threading.Thread(target=writer)
    thread.start()
    time.sleep(1.5)
    daemon.stop(signal.SIGKILL)
    stop.set()
    thread.join(timeout=30)
    assert len(attempted) > 5
    daemon = Daemon(tmp_path, data)
    try:
        with Client(daemon.address, "m", layout) as c:
            num_exact = 0
            for tokens, kv in attempted:
                back = c.get(tokens, as_numpy=True)
                if back is not None:
                    assert np.array_equal(back, kv[:, :, :, : back.shape[3]])
                    num_exact += 1
            assert num_exact > 0  # flushed sequences survived the crash
    finally:
        daemon.stop()


def test_second_daemon_on_a_bound_address_refuses_to_start(tmp_path):
    first = Daemon(tmp_path, tmp_path / "data-1")
    try:
        second = subprocess.run(
            [sys.executable, "-m", "kvstore", "serve", "--listen", first.address,
             "--data-dir", str(tmp_path / "data-2")],
            capture_output=True, text=True, timeout=60)
        assert second.returncode == 2, second.stderr
        assert f"cannot bind {first.address}" in second.stderr
        assert "daemon listening" not in second.stderr
        fetch_stats(first.address, timeout_s=5)  # the first one is untouched
    finally:
        assert first.stop() == 0
