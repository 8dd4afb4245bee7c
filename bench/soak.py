"""Soak: N client processes for M minutes of mixed load while faults are injected.

Runs a real daemon (``python -m kvstore serve``, write-through) over DRAM, a disk
tier on a small tmpfs (mounted when run as root; otherwise a plain directory and the
full-disk fault is skipped, which the summary says), and a 3-master Redis Cluster with
one replica each (real redis-server processes on free loopback ports). Clients put,
get, get_layers, lookup and delete their own sequences and check every byte read
against XXH3-64 digests they keep. On a schedule spread over the run it corrupts disk
files, kills a Redis master (which has a replica), corrupts Redis values, kills a
client holding arena leases, fills the disk, kills -9 and restarts the daemon, kills a
master with no replica, and restarts the daemon gracefully; after each restart every
client re-reads what it was acknowledged. A last phase measures what write-back loses
to a kill -9. Prints one JSON line (the summary); progress goes to stderr. Exits 1
when a read returned wrong bytes or a chunk whose delete was acknowledged
(``resurrected_after_delete``).

    python bench/soak.py --processes 16 --minutes 4
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import shutil
import sys
import tempfile
from pathlib import Path

from _common import emit
from _soak_client import OPS, SoakSpec
from _soak_run import SoakRun


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--processes", type=int, default=16, help="client processes (16)")
    p.add_argument("--minutes", type=float, default=5.0, help="length of the loaded run (5)")
    p.add_argument("--seconds", type=float, help="length in seconds (overrides --minutes)")
    p.add_argument("--slots", type=int, default=24, help="sequences per client (24)")
    p.add_argument("--victim-slots", type=int, default=4,
                   help="of which the fault injector may corrupt the last N (4)")
    p.add_argument("--max-chunks", type=int, default=4, help="chunks per sequence, 1..N (4)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--chunk-tokens", type=int, default=32)
    p.add_argument("--mix", default="25,30,15,20,10",
                   help="weights of " + ",".join(OPS) + " (25,30,15,20,10)")
    p.add_argument("--cpu-mib", type=int, default=32, help="DRAM tier capacity (32 MiB)")
    p.add_argument("--disk-mib", type=int, default=256,
                   help="disk tier capacity; the tmpfs is 1.25x this (256 MiB)")
    p.add_argument("--writeback-seconds", type=float, default=8.0,
                   help="load before the write-back phase's kill -9 (8; 0 skips the phase)")
    p.add_argument("--writeback-writers", type=int, default=4)
    p.add_argument("--flush-interval-s", type=float, default=1.0,
                   help="write-back phase's engine.flush_interval_s (1.0, the default)")
    p.add_argument("--corrupt", default="bit_flipped,truncated,swapped",
                   help="what the corruption faults do to disk files and Redis values: "
                        "bit_flipped, truncated, swapped (another chunk's valid object)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", help="keep files here (default: a temp dir, removed)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    weights = tuple(float(w) for w in args.mix.split(","))
    if len(weights) != len(OPS):
        raise SystemExit(f"--mix needs {len(OPS)} weights ({','.join(OPS)})")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="kvstore-soak-"))
    spec = SoakSpec(address="", namespace="soak", num_layers=args.layers,
                    num_kv_heads=args.kv_heads, head_dim=args.head_dim,
                    chunk_tokens=args.chunk_tokens, num_slots=args.slots,
                    num_victim_slots=min(args.victim_slots, args.slots - 1),
                    max_chunks=args.max_chunks, op_weights=weights, seed=args.seed)
    duration_s = args.seconds if args.seconds is not None else args.minutes * 60
    run = SoakRun(mp.get_context("spawn"), workdir, spec, args, duration_s)
    try:
        summary = run.run()
    finally:
        run.cleanup()
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    emit("soak", "summary", **summary)
    is_clean = summary["wrong_bytes"] == 0 and summary["resurrected_after_delete"] == 0
    return 0 if is_clean else 1


if __name__ == "__main__":
    sys.exit(main())
