"""Same-host get of ~1 GB of SmolLM2-shaped raw chunks: arena vs memcpy vs streamed gRPC.

One daemon (DRAM only), one run, interleaved repetitions, best of each:

- ``memcpy_fresh``: numpy copy of the same bytes into a new array (what a get
  returns: fresh pages, first-touch faults included); ``memcpy_warm``: into an
  array reused across repetitions (the pure bandwidth ceiling).
- ``arena_get``: ``Client(transport="arena").get`` — lease, map, copy out of the
  shared-memory arena with every object's checksum verified, release.
- ``stream_get``: ``Client(transport="stream").get`` over gRPC on loopback.
- ``request_*`` (the same-host round trip an inference server feels, 128 MiB =
  1024 tokens of Llama-8B shape by default; p50 and p99 over ``--request-repeat``
  interleaved runs): ``request_memcpy_warm`` (numpy copy into a reused buffer, the
  baseline), ``request_get_out`` (``get(out=buffer)``: one verified copy out of the
  arena into the caller's buffer, its chunks split across the client's
  ``copy_threads`` (2 on 2 cores); ``_one_thread``: ``copy_threads=1``;
  ``_unverified``: ``verify=False``, headers only), ``request_get`` (``get()``
  into a new array), ``request_put`` (``put``: reserve, build the objects in
  the arena, commit; the chunks are deleted, untimed, before each put;
  ``_one_thread`` as above) and ``request_memcpy_fresh``.
- ``layer_overlap``: ``get_layers`` with per-layer consumer work that does not
  occupy the CPU (a stand-in for a GPU kernel launched per layer), against
  get-then-work, on a smaller sequence.
- GPU figures (H2D from the registered arena vs from pinned memory, kvikio vs
  POSIX reads, CUDA IPC get vs a D2D copy) need CUDA; without it one line says
  they were skipped and nothing is measured.

    python bench/bench_local.py               # ~1 GB (170 chunks of 5.9 MB)
    python bench/bench_local.py --mb 64       # smoke size
    python bench/bench_local.py --only request --request-repeat 10
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
# Llama-3-8B's KV shape: 128 KiB per token, so 1024 tokens are a 128 MiB request.
LLAMA8B = KVLayout(num_layers=32, num_kv_heads=8, head_dim=128, dtype="float16",
                   chunk_tokens=256)


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


def _percentiles(samples: list[float]) -> tuple[float, float]:
    return float(np.percentile(samples, 50)), float(np.percentile(samples, 99))


def bench_request(address: str, num_tokens: int, repeat: int) -> None:
    """p50/p99 of a same-host put and get of one request against a warm memcpy."""
    rng = np.random.default_rng(2)
    kv = rng.standard_normal(LLAMA8B.shape(num_tokens), dtype=np.float32).astype(np.float16)
    tokens = rng.integers(0, 128_000, size=num_tokens).tolist()
    warm, out = np.empty_like(kv), np.empty_like(kv)
    samples: dict[str, list[float]] = {name: [] for name in (
        "memcpy_warm", "get_out", "get_out_one_thread", "get_out_unverified", "put",
        "put_one_thread", "get", "memcpy_fresh")}
    with Client(address, "request", LLAMA8B, transport="arena") as client, \
            Client(address, "request", LLAMA8B, transport="arena", copy_threads=1) as single:
        def put(writer: Client) -> float:
            writer.delete(tokens)
            return _timed(lambda: writer.put(tokens, kv))

        steps = {"memcpy_warm": lambda: _timed(lambda: np.copyto(warm, kv)),
                 "get_out": lambda: _timed(lambda: client.get(tokens, out=out)),
                 "get_out_one_thread": lambda: _timed(lambda: single.get(tokens, out=out)),
                 "get_out_unverified": lambda: _timed(
                     lambda: client.get(tokens, out=out, verify=False)),
                 "put": lambda: put(client),
                 "put_one_thread": lambda: put(single),
                 "get": lambda: _timed(lambda: client.get(tokens, as_numpy=True)),
                 "memcpy_fresh": lambda: _timed(lambda: np.copyto(np.empty_like(kv), kv))}
        client.put(tokens, kv)
        client.get(tokens, out=out)
        assert out.tobytes() == kv.tobytes(), "get(out=) is not bit-exact"
        for _ in range(2):  # warm-up (the client's arena mapping is prefaulting meanwhile)
            for fn in steps.values():
                fn()
        for _ in range(repeat):
            for name, fn in steps.items():
                samples[name].append(fn())
    p50_memcpy, _ = _percentiles(samples["memcpy_warm"])
    common = {"bytes": kv.nbytes, "tokens": num_tokens, "repeat": repeat,
              "shape": "llama-8b [32, 2, 8, T, 128] fp16"}
    for name, values in samples.items():
        p50, p99 = _percentiles(values)
        emit("local", f"request_{name}", p50_ms=round(p50 * 1e3, 2), p99_ms=round(p99 * 1e3, 2),
             p99_over_p50=round(p99 / p50, 2), mb_per_s_p50=round(kv.nbytes / 1e6 / p50, 1),
             vs_memcpy_warm=round(p50_memcpy / p50, 3), **common)


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
    parser.add_argument("--request-tokens", type=int, default=1024,
                        help="tokens of the Llama-8B-shaped request (128 KiB each)")
    parser.add_argument("--request-repeat", type=int, default=10)
    parser.add_argument("--only", choices=["all", "request"], default="all")
    args = parser.parse_args(argv)
    mb = 1.0 if args.only == "request" else args.mb
    chunks = max(1, round(mb * 1e6 / LAYOUT.chunk_bytes))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 49152, size=chunks * LAYOUT.chunk_tokens).tolist()
    kv = rng.standard_normal(LAYOUT.shape(len(tokens)), dtype=np.float32).astype(np.float16)
    common = {"chunks": chunks, "bytes": kv.nbytes, "chunk_bytes": LAYOUT.chunk_bytes}
    request_bytes = LLAMA8B.chunk_bytes * args.request_tokens // LLAMA8B.chunk_tokens
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "kvstore.toml"
        capacity = kv.nbytes * 5 // 4 + 3 * request_bytes + (256 << 20)
        config.write_text(f"[tiers.cpu]\ncapacity_bytes = {capacity}\n"
                          "[tiers.disk]\nenabled = false\n")
        with daemon(Path(tmp) / "data", "--config", str(config)) as address:
            bench_request(address, args.request_tokens, args.request_repeat)
            if args.only == "request":
                return 0
            with Client(address, "bench", LAYOUT, transport="stream") as client:
                put_s = _timed(lambda: client.put(tokens, kv))
            emit("local", "stream_put", mb_per_s=round(kv.nbytes / 1e6 / put_s, 1), **common)
            _bench_gets(address, tokens, kv, args.repeat, common)
            _bench_layer_overlap(address, args.repeat)
            _bench_gpu(address, args.repeat)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
