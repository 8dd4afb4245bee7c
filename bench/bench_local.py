"""Same-host get of ~1 GB of SmolLM2-shaped raw chunks: arena vs memcpy vs streamed gRPC.

One daemon (DRAM only), one run, interleaved repetitions, best of each:

- ``memcpy_fresh``: numpy copy of the same bytes into a new array (what a get
  returns: fresh pages, first-touch faults included); ``memcpy_warm``: into an
  array reused across repetitions (the pure bandwidth ceiling).
- ``arena_get``: ``Client(transport="arena").get`` — lease, map, copy out of the
  shared-memory arena with every object's checksum verified, release.
- ``stream_get``: ``Client(transport="stream").get`` over gRPC on loopback.
- ``layer_overlap``: ``get_layers`` with per-layer consumer work that does not
  occupy the CPU (a stand-in for a GPU kernel launched per layer), against
  get-then-work, on a smaller sequence.
- GPU figures (H2D from the registered arena vs from pinned memory, kvikio vs
  POSIX reads, CUDA IPC get vs a D2D copy) need CUDA; without it one line says
  they were skipped and nothing is measured.

    python bench/bench_local.py               # ~1 GB (170 chunks of 5.9 MB)
    python bench/bench_local.py --mb 64       # smoke size
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import daemon, emit  # noqa: E402

from kvstore import Client, KVLayout  # noqa: E402

LAYOUT = KVLayout(num_layers=30, num_kv_heads=3, head_dim=64, dtype="float16", chunk_tokens=256)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _best_interleaved(fns: dict[str, object], repeat: int) -> dict[str, float]:
    """Best seconds of each function, repetitions interleaved so load noise hits all alike."""
    for fn in fns.values():
        fn()  # warm-up
    best = {name: float("inf") for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            best[name] = min(best[name], _timed(fn))
    return best


def _bench_gets(address: str, tokens: list[int], kv: np.ndarray, repeat: int,
                common: dict) -> None:
    warm = np.empty_like(kv)
    with Client(address, "bench", LAYOUT, transport="arena") as arena, \
            Client(address, "bench", LAYOUT, transport="stream") as stream:
        got = arena.get(tokens, as_numpy=True)
        assert got is not None and got.tobytes() == kv.tobytes(), "arena get is not bit-exact"
        got = stream.get(tokens, as_numpy=True)
        assert got is not None and got.tobytes() == kv.tobytes(), "stream get is not bit-exact"
        del got
        best = _best_interleaved({
            "memcpy_fresh": lambda: np.copyto(np.empty_like(kv), kv),
            "memcpy_warm": lambda: np.copyto(warm, kv),
            "arena_get": lambda: arena.get(tokens, as_numpy=True),
            "stream_get": lambda: stream.get(tokens, as_numpy=True),
        }, repeat)
    mb = kv.nbytes / 1e6
    for name, seconds in best.items():
        fields = {"mb_per_s": round(mb / seconds, 1), "seconds": round(seconds, 4)}
        if name in ("arena_get", "stream_get"):
            fields["vs_memcpy_fresh"] = round(best["memcpy_fresh"] / seconds, 3)
            fields["vs_memcpy_warm"] = round(best["memcpy_warm"] / seconds, 3)
        if name == "arena_get":
            fields["vs_stream_get"] = round(best["stream_get"] / seconds, 2)
        emit("local", name, **fields, **common)


def _bench_layer_overlap(address: str, repeat: int) -> None:
    chunks = 32
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 49152, size=chunks * LAYOUT.chunk_tokens).tolist()
    kv = rng.standard_normal(LAYOUT.shape(len(tokens))).astype(np.float16)
    with Client(address, "overlap", LAYOUT, transport="stream") as client:
        client.put(tokens, kv)
        get_s = min(_timed(lambda: client.get(tokens, as_numpy=True)) for _ in range(repeat))
        # the layered stream alone (no work): what the overlap can at best hide behind
        layers_s = min(_timed(lambda: list(client.get_layers(tokens, as_numpy=True)))
                       for _ in range(repeat))
        work_s = get_s / LAYOUT.num_layers  # balanced: as much work as transfer per layer

        def serial() -> None:
            client.get(tokens, as_numpy=True)
            for _ in range(LAYOUT.num_layers):
                time.sleep(work_s)

        def layered() -> None:
            for _layer, _arr in client.get_layers(tokens, as_numpy=True):
                time.sleep(work_s)

        best = _best_interleaved({"serial": serial, "layered": layered}, repeat)
    total_work = work_s * LAYOUT.num_layers
    hidden = (best["serial"] - best["layered"]) / min(get_s, total_work)
    emit("local", "layer_overlap", serial_s=round(best["serial"], 4),
         layered_s=round(best["layered"], 4), get_s=round(get_s, 4),
         get_layers_s=round(layers_s, 4),
         work_s=round(total_work, 4), fraction_hidden=round(hidden, 3),
         bytes=kv.nbytes, chunks=chunks,
         note="per-layer work is a sleep (a GPU kernel's stand-in: no CPU held)")


def _bench_gpu(address: str, repeat: int) -> None:
    try:
        import torch
    except ImportError:
        torch = None
    if torch is None or not torch.cuda.is_available():
        emit("local", "gpu", skipped=True,
             reason="no CUDA device: H2D from the registered arena vs pinned cudaMemcpy, "
                    "kvikio vs POSIX reads and CUDA IPC get vs D2D were NOT measured")
        return
    from _gpu_local import bench_gpu  # only imported where CUDA exists

    bench_gpu(address, LAYOUT, repeat, emit)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mb", type=float, default=1000.0, help="MB of chunks to get")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    chunks = max(1, round(args.mb * 1e6 / LAYOUT.chunk_bytes))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 49152, size=chunks * LAYOUT.chunk_tokens).tolist()
    kv = rng.standard_normal(LAYOUT.shape(len(tokens)), dtype=np.float32).astype(np.float16)
    common = {"chunks": chunks, "bytes": kv.nbytes, "chunk_bytes": LAYOUT.chunk_bytes}
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "kvstore.toml"
        config.write_text(f"[tiers.cpu]\ncapacity_bytes = {kv.nbytes * 5 // 4 + (256 << 20)}\n"
                          "[tiers.disk]\nenabled = false\n")
        with daemon(Path(tmp) / "data", "--config", str(config)) as address:
            with Client(address, "bench", LAYOUT, transport="stream") as client:
                put_s = _timed(lambda: client.put(tokens, kv))
            emit("local", "stream_put", mb_per_s=round(kv.nbytes / 1e6 / put_s, 1), **common)
            _bench_gets(address, tokens, kv, args.repeat, common)
            _bench_layer_overlap(address, args.repeat)
            _bench_gpu(address, args.repeat)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
