"""What kill -9 loses under a burst of puts: write-back against write-through.

A real daemon (fsync on) takes puts of distinct 64-token sequences from several
client threads; after ``--seconds`` it is killed with SIGKILL, restarted on the same
directory, and every acknowledged put is looked up. Per write policy one JSON line:
acknowledged and lost puts, the age at the kill of the oldest lost one (write-back
promises at most ``engine.flush_interval_s``) and the put rate. write-through is the
baseline of the same run: it loses nothing by construction, at the disk's pace.

    python bench/bench_durability.py              # 4 s bursts, 4 client threads
    python bench/bench_durability.py --smoke      # 1 s, 2 threads
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, free_port  # noqa: E402

from kvstore.client import Client  # noqa: E402
from kvstore.errors import KVStoreError  # noqa: E402
from kvstore.layout import KVLayout  # noqa: E402

LAYOUT = KVLayout(num_layers=4, num_kv_heads=3, head_dim=64, dtype="float16", chunk_tokens=16)
INTERVAL_S = 1.0  # the README's engine.flush_interval_s
NUM_TOKENS = 64


def _sequence(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 50_000, NUM_TOKENS, dtype=np.int32)
    return tokens, rng.standard_normal(LAYOUT.shape(NUM_TOKENS), dtype=np.float32).astype("float16")


def _start(data: Path, config: Path) -> tuple[subprocess.Popen, str]:
    address = f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen([sys.executable, "-m", "kvstore", "serve", "--config", str(config),
                             "--listen", address, "--data-dir", str(data)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    channel = grpc.insecure_channel(address)
    grpc.channel_ready_future(channel).result(timeout=60)
    channel.close()
    time.sleep(1.0)  # let the arena's background prefault finish
    return proc, address


def _burst(address: str, seconds: float, num_threads: int) -> dict[int, float]:
    acked: dict[int, float] = {}
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds + 30  # the kill ends it first

    def writer(offset: int) -> None:
        with Client(address, "m", LAYOUT, timeout_s=10) as c:
            seed = offset
            while time.monotonic() < stop_at:
                try:
                    c.put(*_sequence(seed))
                except KVStoreError:
                    return
                with lock:
                    acked[seed] = time.monotonic()
                seed += num_threads

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(num_threads)]
    for t in threads:
        t.start()
    return acked, threads


def measure(policy: str, seconds: float, num_threads: int) -> None:
    with tempfile.TemporaryDirectory(prefix="kvstore-bench-durability-") as tmp:
        data, config = Path(tmp) / "data", Path(tmp) / "kvstore.toml"
        config.write_text(f"[engine]\nwrite_policy = '{policy}'\nflush_interval_s = "
                          f"{INTERVAL_S}\n[tiers.disk]\nfsync = true\n"
                          # a small arena: its start-up prefault must not overlap the burst
                          "[tiers.cpu]\ncapacity_bytes = 268435456\n")
        proc, address = _start(data, config)
        acked, threads = _burst(address, seconds, num_threads)
        started = time.monotonic()
        time.sleep(seconds)
        killed_at = time.monotonic()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        for t in threads:
            t.join()
        acked = {seed: at for seed, at in acked.items() if at <= killed_at}
        proc, address = _start(data, config)
        try:
            with Client(address, "m", LAYOUT) as c:
                lost = [s for s in acked if c.lookup(_sequence(s)[0]) < NUM_TOKENS]
        finally:
            proc.terminate()
            proc.wait()
    oldest = max((killed_at - acked[s] for s in lost), default=0.0)
    emit("durability", "kill_9_under_put_burst", policy=policy, flush_interval_s=INTERVAL_S,
         seconds=seconds, threads=num_threads, acked=len(acked), lost=len(lost),
         oldest_lost_s=round(oldest, 3),
         puts_per_s=round(len(acked) / (killed_at - started), 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="burst length before kill -9")
    parser.add_argument("--threads", type=int, default=4, help="client threads")
    parser.add_argument("--smoke", action="store_true", help="1 s bursts, 2 threads")
    args = parser.parse_args()
    seconds, threads = (1.0, 2) if args.smoke else (args.seconds, args.threads)
    for policy in ("write-through", "write-back"):
        measure(policy, seconds, threads)


if __name__ == "__main__":
    main()
