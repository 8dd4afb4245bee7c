"""The soak's write-back phase: what a kill -9 loses when DRAM reaches disk only later.

A daemon with ``engine.write_policy = "write-back"`` and no Redis tier takes puts of
fresh sequences from a few writer processes; it is killed with SIGKILL mid-load and
restarted on the same disk directory; every acknowledged put is then read back.
Lost puts are expected here (that is what write-back trades for latency); the phase
reports how many and how old the oldest was when the daemon died, to compare with
``engine.flush_interval_s``.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from pathlib import Path
from typing import Any

from _procs import DaemonProcess, free_port
from _soak_client import SoakSpec, chunk_digests, kv_for, slot_tokens

_WRITER_BASE_ID = 20_000  # client ids no soak worker uses


def writer_main(writer_id: int, spec: SoakSpec, stop: Any, results: Any) -> None:
    """Put fresh sequences until ``stop``; send the (sequence, ack wall time) of each ack."""
    from kvstore.client import Client

    acked: list[tuple[int, float]] = []
    with Client(spec.address, spec.namespace, spec.layout(), timeout_s=2.0,
                transport="stream") as client:
        results.put(("ready", writer_id, None))
        i = 0
        while not stop.is_set():
            tokens = slot_tokens(spec, _WRITER_BASE_ID + writer_id, i)
            try:
                client.put(tokens, kv_for(spec, tokens))
                acked.append((i, time.time()))
            except Exception:  # noqa: BLE001 - the daemon was killed: stop writing
                break
            i += 1
    results.put(("done", writer_id, acked))


def write_config(path: Path, address: str, disk_dir: Path, flush_interval_s: float) -> None:
    path.write_text(
        f'[server]\nlisten = "{address}"\ndrain_timeout_s = 5.0\n'
        f'[engine]\nwrite_policy = "write-back"\nflush_interval_s = {flush_interval_s}\n'
        f'[tiers.cpu]\ncapacity_bytes = "256MiB"\n'
        f'[tiers.disk]\npath = "{disk_dir}"\ncapacity_bytes = "1GiB"\nfsync = true\n')


def run_writeback_phase(ctx: Any, workdir: Path, base: SoakSpec, num_writers: int,
                        seconds: float, flush_interval_s: float) -> dict[str, Any]:
    """Run the phase; returns acknowledged/lost counts and the oldest lost put's age."""
    address = f"127.0.0.1:{free_port()}"
    spec = dataclasses.replace(base, address=address, namespace=base.namespace + "-writeback")
    config = workdir / "writeback.toml"
    write_config(config, address, workdir / "writeback-disk", flush_interval_s)
    daemon = DaemonProcess(config, address, workdir / "writeback-daemon.log")
    daemon.start()
    stop, results = ctx.Event(), ctx.Queue()
    writers = [ctx.Process(target=writer_main, args=(i, spec, stop, results), daemon=True)
               for i in range(num_writers)]
    for w in writers:
        w.start()
    for _ in writers:
        results.get(timeout=300)  # ("ready", ...): load starts when every writer is up
    time.sleep(seconds)
    killed_at = time.time()
    daemon.stop(signal.SIGKILL)
    stop.set()
    acked = {writer_id: puts for _, writer_id, puts in
             (results.get(timeout=60) for _ in writers)}
    for w in writers:
        w.join(timeout=30)
    daemon.start()
    try:
        return _check(spec, acked, killed_at, flush_interval_s)
    finally:
        daemon.stop(signal.SIGTERM)


def _check(spec: SoakSpec, acked: dict[int, list[tuple[int, float]]], killed_at: float,
           flush_interval_s: float) -> dict[str, Any]:
    from kvstore.client import Client

    lost_ages, wrong = [], 0
    with Client(spec.address, spec.namespace, spec.layout(), transport="stream") as client:
        for writer_id, puts in acked.items():
            for seq, acked_at in puts:
                tokens = slot_tokens(spec, _WRITER_BASE_ID + writer_id, seq)
                out = client.get(tokens, as_numpy=True)
                want = chunk_digests(kv_for(spec, tokens), spec.chunk_tokens)
                if out is None or out.shape[3] < len(tokens):
                    lost_ages.append(killed_at - acked_at)
                if out is not None:
                    got = chunk_digests(out, spec.chunk_tokens)
                    wrong += sum(g != w for g, w in zip(got, want, strict=False))
    num_acked = sum(len(p) for p in acked.values())
    return {"policy": "write-back", "flush_interval_s": flush_interval_s,
            "acknowledged_puts": num_acked, "lost_after_kill_9": len(lost_ages),
            "oldest_lost_age_s": round(max(lost_ages), 3) if lost_ages else None,
            "lost_older_than_flush_interval": sum(a > flush_interval_s for a in lost_ages),
            "wrong_chunks": wrong}
