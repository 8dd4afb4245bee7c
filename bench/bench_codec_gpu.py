"""GPU decode throughput of kvq objects on real SmolLM2 KV: batched vs one object at a time.

For each kvq level, the 256-token chunks of SmolLM2's exact prefix cache (fp16, cut
as in bench_codec.py) are encoded on the CPU, then decoded on CUDA in batches of 1,
8 and 64 objects (chunks reused in turn when the prefix has fewer). One JSON line
per (level, batch, method):

- ``batched``: ``gpu.prepare_many`` (host: section checks and packing into one
  pinned buffer, reported as ``host_ms``) then ``gpu.decode_prepared`` (device: one
  H2D copy, the CDF and lane launches, dequantisation, one D2H check; wall time
  with torch.cuda.synchronize, ``device_ms``). ``gb_per_s`` is decoded fp16 bytes
  over ``device_ms``, ``end_to_end_gb_s`` over ``host_ms + device_ms``.
- ``per_object``: ``gpu.decode_on_device`` once per object on the same objects
  (host and device, as a caller decoding chunk by chunk would).
- ``d2d_copy``: ``copy_`` of as many bytes as were decoded, device to device: the
  memory-bandwidth ceiling, measured in the same run.

Checksum verification (``parse_kvq``) is reported apart as ``verify_ms``: a store has
verified an object before anyone decodes it. Times are the best of ``--repeat``
after a warm-up. ``max_abs_error`` compares the first object with the CPU decoder.

    python bench/bench_codec_gpu.py                    # needs CUDA, else one "skipped" line
    python bench/bench_codec_gpu.py --levels balanced --batches 1,64
    python bench/bench_codec_gpu.py --smoke            # tiny synthetic objects, no model; on
                                                       # a CPU the kernels run interpreted
    python bench/bench_codec_gpu.py --host-only        # the host half alone, no GPU needed
    python bench/bench_codec_gpu.py --save-kv .gpu_data/smollm2_kv.npy --prefix-tokens 1024
                                   # where the model is installed: keep its KV in a file ...
    python bench/bench_codec_gpu.py --kv-file .gpu_data/smollm2_kv.npy
                                   # ... and measure from it where the model is not (the GPU
                                   # machine: the model's wheel is too big to carry there)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit  # noqa: E402

from kvstore.layout import KVLayout  # noqa: E402

CHUNK = 256
SUBJECT = "codec_gpu"


def _best(fn: Callable[[], Any], repeat: int, sync: Callable[[], None]) -> float:
    fn()
    sync()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def model_chunks(prefix_tokens: int, offset: int) -> tuple[KVLayout, list[np.ndarray]]:
    """SmolLM2's exact cache of a prefix of the sample text, as fp16 256-token chunks."""
    import torch

    from kvstore.codec.calibrate_model import prefill
    from kvstore.models.smollm2 import load_smollm2, sample_tokens

    torch.set_num_threads(min(8, os.cpu_count() or 1))
    model, tokenizer = load_smollm2()
    ids = sample_tokens(tokenizer, prefix_tokens, offset)
    exact = prefill(model, ids, prefix_tokens).astype(np.float16)
    layout = KVLayout(exact.shape[0], exact.shape[2], exact.shape[4], "float16", CHUNK)
    return layout, [np.ascontiguousarray(exact[:, :, :, t : t + CHUNK])
                    for t in range(0, prefix_tokens - CHUNK + 1, CHUNK)]


def file_chunks(path: str) -> tuple[KVLayout, list[np.ndarray]]:
    """The chunks of a KV array saved by ``--save-kv`` (``[L, 2, H, N, D]`` float16)."""
    exact = np.load(path)
    layout = KVLayout(exact.shape[0], exact.shape[2], exact.shape[4], "float16", CHUNK)
    return layout, [np.ascontiguousarray(exact[:, :, :, t : t + CHUNK])
                    for t in range(0, exact.shape[3] - CHUNK + 1, CHUNK)]


def synthetic_chunks(count: int) -> tuple[KVLayout, list[np.ndarray]]:
    rng = np.random.default_rng(0)
    layout = KVLayout(2, 2, 16, "float16", 24)
    scale = np.array([1.0, 0.3])[None, :, None, None, None]
    return layout, [(rng.standard_normal(layout.chunk_shape) * scale).astype(np.float16)
                    for _ in range(count)]


def measure(level: str, layout: KVLayout, chunks: list[np.ndarray], batches: list[int],
            repeat: int, device: str, host_only: bool = False, **extra: Any) -> None:
    """Encode the chunks at ``level``, decode batches on ``device``, emit the lines."""
    import torch

    from kvstore import codec

    name = (torch.cuda.get_device_name() if device == "cuda" else
            "cpu (host half only)" if host_only else "cpu (TRITON_INTERPRET=1)")
    blobs = [codec.encode(c, layout, level) for c in chunks]
    bits = 8 * sum(len(b) for b in blobs) / sum(c.size for c in chunks)
    for batch in batches:
        decoded = batch * chunks[0].nbytes
        common = {"level": level, "batch": batch, "decoded_mb": round(decoded / 1e6, 3),
                  "bits_per_element": round(bits, 4), "device": name, **extra}
        measure_batch([blobs[i % len(blobs)] for i in range(batch)], decoded, repeat, device,
                      common, host_only)


def measure_batch(data: list[bytes], decoded: int, repeat: int, device: str,
                  common: dict[str, Any], host_only: bool = False) -> None:
    """The three lines (batched, per_object, d2d_copy) of one batch of objects, or the
    host half alone (``host_prepare``)."""
    import torch

    from kvstore.codec import gpu
    from kvstore.codec.kvq import decode_layers_f32, parse_kvq

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    objs = [parse_kvq(d) for d in data]
    layers = range(objs[0].header.num_layers)
    verify_s = _best(lambda: [parse_kvq(d) for d in data], repeat, lambda: None)
    host_s = _best(lambda: gpu.prepare_many(objs, device), repeat, lambda: None)
    if host_only:
        emit(SUBJECT, "host_prepare", **common, verify_ms=round(verify_s * 1e3, 3),
             host_ms=round(host_s * 1e3, 3), gb_per_s=round(decoded / host_s / 1e9, 3))
        return
    prepared = gpu.prepare_many(objs, device)
    first = gpu.decode_prepared(prepared)[0].float().cpu().numpy()
    err = float(np.abs(first - decode_layers_f32(objs[0], layers)).max())
    device_s = _best(lambda: gpu.decode_prepared(prepared), repeat, sync)
    emit(SUBJECT, "batched", **common, verify_ms=round(verify_s * 1e3, 3),
         host_ms=round(host_s * 1e3, 3), device_ms=round(device_s * 1e3, 3),
         gb_per_s=round(decoded / device_s / 1e9, 3),
         end_to_end_gb_s=round(decoded / (host_s + device_s) / 1e9, 3), max_abs_error=err)
    loop_s = _best(lambda: [gpu.decode_on_device(o, layers, device) for o in objs], repeat, sync)
    emit(SUBJECT, "per_object", **common, ms=round(loop_s * 1e3, 3),
         gb_per_s=round(decoded / loop_s / 1e9, 3))
    src = torch.empty(decoded, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_s = _best(lambda: dst.copy_(src), repeat, sync)
    emit(SUBJECT, "d2d_copy", **common, ms=round(copy_s * 1e3, 3),
         gb_per_s=round(decoded / copy_s / 1e9, 3))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true",
                   help="tiny synthetic objects without the model (interpreted on a CPU)")
    p.add_argument("--levels", default="near-lossless,high,balanced,compact,aggressive")
    p.add_argument("--batches", default="1,8,64", help="objects per decode call")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--prefix-tokens", type=int, default=2048, help="model tokens to prefill")
    p.add_argument("--offset", type=int, default=0, help="character offset of the prompt text")
    p.add_argument("--host-only", action="store_true",
                   help="time only the host half (gpu.prepare_many) on real chunks; no GPU")
    p.add_argument("--kv-file", help="read SmolLM2's chunks from this .npy (see --save-kv) "
                   "instead of running the model")
    p.add_argument("--save-kv", help="run the model, save its prefix KV to this .npy, exit")
    args = p.parse_args(argv)
    import torch

    levels = args.levels.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    if args.smoke:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu":  # must precede the first import of the kernels
            os.environ.setdefault("TRITON_INTERPRET", "1")
        layout, chunks = synthetic_chunks(2)
        measure("balanced", layout, chunks, [1, 3], 1, device, smoke=True)
        return 0
    if args.save_kv:
        _, chunks = model_chunks(args.prefix_tokens, args.offset)
        Path(args.save_kv).parent.mkdir(parents=True, exist_ok=True)
        np.save(args.save_kv, np.concatenate(chunks, axis=3))
        return 0
    source = (lambda: file_chunks(args.kv_file)) if args.kv_file else (
        lambda: model_chunks(args.prefix_tokens, args.offset))
    if args.host_only:
        layout, chunks = source()
        for level in levels:
            measure(level, layout, chunks, batches, args.repeat, "cpu", host_only=True,
                    model="SmolLM2-135M", chunk_tokens=CHUNK, prefix_tokens=len(chunks) * CHUNK,
                    kv_source=args.kv_file or "model")
        return 0
    if not torch.cuda.is_available():
        emit(SUBJECT, "skipped", skipped=True, reason="no CUDA device; --smoke runs the "
             "decode path interpreted on the CPU")
        return 0
    layout, chunks = source()
    for level in levels:
        measure(level, layout, chunks, batches, args.repeat, "cuda", model="SmolLM2-135M",
                chunk_tokens=CHUNK, prefix_tokens=len(chunks) * CHUNK,
                kv_source=args.kv_file or "model")
    return 0


if __name__ == "__main__":
    sys.exit(main())
