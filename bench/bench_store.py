"""Put/get throughput of SmolLM2-shaped raw chunks through the client and a daemon.

Baselines measured in the same run: a memcpy of the same bytes (numpy copy), a bare
gRPC stream of the same bytes, and a plain read of the daemon's own object files
(against which the disk tier's own read, without gRPC, is also timed). Prints JSON
lines.

    python bench/bench_store.py                 # 48 chunks of 5.9 MB (~280 MB)
    python bench/bench_store.py --chunks 4      # smoke size
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import best_seconds, daemon, emit  # noqa: E402
from _grpc_baseline import bare_stream_mb_s  # noqa: E402

from kvstore import Client, KVLayout  # noqa: E402
from kvstore.config import DiskTierConfig  # noqa: E402
from kvstore.keys import ChunkKey  # noqa: E402
from kvstore.tiers.disk import DiskTier  # noqa: E402

LAYOUT = KVLayout(num_layers=30, num_kv_heads=3, head_dim=64, dtype="float16", chunk_tokens=256)


def _read_files(paths: list[Path]) -> int:
    total = 0
    for path in paths:
        with open(path, "rb") as fh:
            total += len(fh.read())
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--chunks", type=int, default=48, help="chunks per sequence")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 49152, size=args.chunks * LAYOUT.chunk_tokens).tolist()
    kv = rng.standard_normal(LAYOUT.shape(len(tokens))).astype(np.float16)
    nbytes = kv.nbytes
    mb = nbytes / 1e6
    common = {"chunks": args.chunks, "bytes": nbytes, "chunk_bytes": LAYOUT.chunk_bytes}

    copy_s = best_seconds(lambda: np.copyto(np.empty_like(kv), kv), args.repeat)
    emit("store", "memcpy", mb_per_s=mb / copy_s, **common)
    # The transport's own ceiling: the same bytes through a bare grpc.aio stream, in
    # messages of one chunk (a whole raw object, as the daemon sends a plain get) and of
    # one (chunk, layer) (as it sends a get with a layer filter).
    layer_bytes = 2 * LAYOUT.section_bytes
    for name, size in (("bare_grpc_stream", LAYOUT.chunk_bytes),
                       ("bare_grpc_stream_per_layer", layer_bytes)):
        emit("store", name, mb_per_s=bare_stream_mb_s(nbytes, size), message_bytes=size,
             **common)

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        config = Path(tmp) / "kvstore.toml"
        # DRAM big enough for the whole sequence: hot gets come from DRAM.
        config.write_text(f"[tiers.cpu]\ncapacity_bytes = {2 * nbytes + (64 << 20)}\n"
                          f"[tiers.disk]\ncapacity_bytes = {4 * nbytes}\n")
        with daemon(data_dir, "--config", str(config)) as address:
            with Client(address, namespace="bench", layout=LAYOUT, transport="stream") as client:
                start = time.perf_counter()
                client.put(tokens, kv)
                put_s = time.perf_counter() - start
                emit("store", "client_put", mb_per_s=mb / put_s, **common)
                get_s = best_seconds(lambda: client.get(tokens, as_numpy=True), args.repeat)
                emit("store", "client_get_dram", mb_per_s=mb / get_s,
                     vs_memcpy=copy_s / get_s, **common)
                every = list(range(LAYOUT.num_layers))  # a filter: one message per layer
                get_s = best_seconds(lambda: client.get(tokens, layers=every, as_numpy=True),
                                     args.repeat)
                emit("store", "client_get_dram_per_layer", mb_per_s=mb / get_s, **common)
        # Restarted with a DRAM tier too small to hold a chunk: every get reads the disk.
        config.write_text(f"[tiers.cpu]\ncapacity_bytes = 1024\n"
                          f"[tiers.disk]\ncapacity_bytes = {4 * nbytes}\n")
        files = sorted(data_dir.rglob("*.kvc"))
        read_s = best_seconds(lambda: _read_files(files), args.repeat)
        emit("store", "file_read", mb_per_s=mb / read_s, files=len(files), **common)
        # The disk tier's own read of the same files (read + XXH3-64 verify), no gRPC.
        tier = DiskTier(DiskTierConfig(path=str(data_dir), capacity_bytes=4 * nbytes,
                                       fsync=False, io="posix"))
        keys = [ChunkKey(bytes.fromhex(f.stem)) for f in files]
        # each object dropped before the next read, as in the file-read baseline
        tier_s = best_seconds(lambda: sum(len(tier.get(k) or b"") for k in keys), args.repeat)
        tier.close()
        emit("store", "disk_tier_read", mb_per_s=mb / tier_s, vs_file_read=read_s / tier_s,
             **common)
        with daemon(data_dir, "--config", str(config)) as address:
            with Client(address, namespace="bench", layout=LAYOUT, transport="stream") as client:
                got = client.get(tokens, as_numpy=True)
                assert got is not None and got.tobytes() == kv.tobytes()
                get_s = best_seconds(lambda: client.get(tokens, as_numpy=True), args.repeat)
                emit("store", "client_get_disk", mb_per_s=mb / get_s,
                     vs_file_read=read_s / get_s, **common)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
