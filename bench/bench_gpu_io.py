"""GPU data paths of the daemon, each against its baseline measured in the same run.

- ``ipc_get`` vs ``d2d_copy``: ``Client.get(tokens, device="cuda")`` from a daemon
  (subprocess) whose GPU tier holds the chunks: LeaseGpuChunks, the slab opened
  once through CUDA IPC, one device-to-device copy per chunk into a fresh output,
  every chunk's device checksum verified as copied, release. The baseline copies
  the same bytes device to device (``copy_``). Target: >= 0.5 of the copy.
- ``h2d_arena`` vs ``h2d_pinned`` (subject "local", from ``_gpu_local.py``): H2D
  copies out of the daemon's leased arena registered with cudaHostRegister, against
  a copy from an ordinary pinned buffer of the same bytes.
- ``kvikio_read`` vs ``posix_read_h2d`` / ``posix_pinned_h2d``: disk-tier object
  files read into device memory by kvikio (``read_to_device``: GDS, or kvikio's
  compat path), against ``os.read`` into bytes then an H2D copy, and a read into a
  pinned buffer then an H2D copy. The files were just written (page cache warm);
  with ``--drop-caches`` each timed read starts cold (needs root).

Without CUDA every line says "skipped".

    python bench/bench_gpu_io.py                 # ~1 GB of SmolLM2-shaped raw chunks
    python bench/bench_gpu_io.py --mb 64 --repeat 2
    python bench/bench_gpu_io.py --smoke         # skipped lines without CUDA; tiny with it
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import daemon, emit  # noqa: E402

from kvstore import Client, KVLayout  # noqa: E402

SUBJECT = "gpu_io"
LAYOUT = KVLayout(num_layers=30, num_kv_heads=3, head_dim=64, dtype="float16", chunk_tokens=256)


def _best(fn: Callable[[], Any], repeat: int, before: Callable[[], None] = lambda: None
          ) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeat):
        before()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def _data(num_chunks: int) -> tuple[list[int], np.ndarray]:
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, 49152, num_chunks * LAYOUT.chunk_tokens).tolist()
    kv = rng.standard_normal(LAYOUT.shape(len(tokens)), dtype=np.float32).astype(np.float16)
    return tokens, kv


def bench_ipc(num_chunks: int, repeat: int, workdir: Path, common: dict[str, Any]) -> None:
    import torch
    from _gpu_local import bench_gpu

    room = int(num_chunks * (LAYOUT.chunk_bytes + 4096) * 1.25) + (256 << 20)
    config = workdir / "gpu.toml"
    config.write_text(f"[tiers.gpu]\ncapacity_bytes = {room}\npromote_after_hits = 1\n"
                      f"[tiers.cpu]\ncapacity_bytes = {room}\n")
    tokens, kv = _data(num_chunks)
    with daemon(workdir / "data", "--config", str(config)) as address, \
            Client(address, "bench", LAYOUT, timeout_s=600) as client:
        client.put(tokens, kv)
        first = client.get(tokens, device="cuda")  # places every chunk in the GPU tier
        assert first.is_cuda and torch.equal(first.cpu(), torch.from_numpy(kv)), "IPC get"
        assert client.stats()["tiers"][0]["name"] == "gpu", "the daemon has no GPU tier"
        ipc_s = _best(lambda: client.get(tokens, device="cuda"), repeat)
        src = first.clone()
        dst = torch.empty_like(src)
        d2d_s = _best(lambda: dst.copy_(src), repeat)
        gb = kv.nbytes / 1e9
        emit(SUBJECT, "ipc_get", **common, gb=round(gb, 3), gb_per_s=round(gb / ipc_s, 2),
             vs_d2d=round(d2d_s / ipc_s, 3), chunks=num_chunks)
        emit(SUBJECT, "d2d_copy", **common, gb=round(gb, 3), gb_per_s=round(gb / d2d_s, 2))
        bench_gpu(address, LAYOUT, repeat, emit)  # registered arena vs pinned H2D


def _drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as fh:
        fh.write("3\n")


def bench_kvikio(num_chunks: int, repeat: int, workdir: Path, drop: bool,
                 common: dict[str, Any]) -> None:
    import torch

    from kvstore.config import DiskTierConfig
    from kvstore.keys import ChunkKey
    from kvstore.tiers.disk import DiskTier
    from kvstore.tiers.disk_io import PosixIO, device_read_mode, read_to_device, select_io

    try:
        io = select_io("kvikio")
    except Exception as exc:  # kvikio not installed here
        emit(SUBJECT, "kvikio_read", **common, skipped=True, reason=str(exc))
        return
    tier = DiskTier(DiskTierConfig(path=str(workdir / "disk"), fsync=False, io="posix",
                                   capacity_bytes=1 << 40))
    from kvstore.codec.raw import encode_raw

    _, kv = _data(1)
    obj = encode_raw(kv, LAYOUT)
    paths = []
    for i in range(num_chunks):
        key = ChunkKey(hashlib.sha256(b"bench-gpu-io-%d" % i).digest())
        tier.put(key, obj)
        paths.append(tier.path_of(key))
    size = len(obj)
    out = torch.empty(size * num_chunks, dtype=torch.uint8, device="cuda")
    pinned = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    staging = memoryview(pinned.numpy())
    posix = PosixIO()

    def kvikio_all() -> None:
        for i, path in enumerate(paths):
            read_to_device(io, path, out[i * size : (i + 1) * size], staging)

    def posix_h2d() -> None:
        for i, path in enumerate(paths):
            data, _ = posix.read(path)
            out[i * size : (i + 1) * size].copy_(torch.frombuffer(data, dtype=torch.uint8))

    def posix_pinned() -> None:
        for i, path in enumerate(paths):
            posix.read_into(path, staging)
            out[i * size : (i + 1) * size].copy_(pinned)

    before = _drop_caches if drop else (lambda: None)
    gb = size * num_chunks / 1e9
    times = {name: _best(fn, repeat, before) for name, fn in
             (("kvikio_read", kvikio_all), ("posix_read_h2d", posix_h2d),
              ("posix_pinned_h2d", posix_pinned))}
    cache = "cold (drop_caches)" if drop else "warm page cache"
    for name, seconds in times.items():
        extra = {"io": io.name, "mode": device_read_mode(io)} if name == "kvikio_read" else {}
        emit(SUBJECT, name, **common, **extra, gb=round(gb, 3), gb_per_s=round(gb / seconds, 2),
             vs_posix_read_h2d=round(times["posix_read_h2d"] / seconds, 3), cache=cache)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=int, default=1000, help="MB of chunks for the IPC get")
    p.add_argument("--disk-mb", type=int, default=1000, help="MB of object files for kvikio")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--drop-caches", action="store_true", help="cold reads (root only)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes")
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        for name in ("ipc_get", "h2d_arena", "kvikio_read"):
            emit(SUBJECT, name, skipped=True, reason="no CUDA device")
        return 0
    if args.smoke:
        args.mb, args.disk_mb, args.repeat = 24, 24, 1
    common = {"device": torch.cuda.get_device_name()}
    chunks = max(1, args.mb * 10**6 // LAYOUT.chunk_bytes)
    disk_chunks = max(1, args.disk_mb * 10**6 // LAYOUT.chunk_bytes)
    with tempfile.TemporaryDirectory() as tmp:
        bench_ipc(chunks, args.repeat, Path(tmp), common)
    with tempfile.TemporaryDirectory() as tmp:
        bench_kvikio(disk_chunks, args.repeat, Path(tmp), args.drop_caches, common)
    return 0


if __name__ == "__main__":
    sys.exit(main())
