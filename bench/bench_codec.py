"""Codec benchmark on real SmolLM2 KV: bits/element, Δppl, encode/decode MB/s per core.

For each prompt (pydoc_data.topics text): prefill a prefix, cut its exact cache
into 256-token chunks, encode + decode every chunk with each method, rebuild the
cache from the decoded chunks and score the next 512 tokens; Δppl is against the
exact (float32) cache in the same run. Sizes count every byte of the stored object
(header, tables, side information). Speeds are fp16-equivalent MB/s per core:
bytes over the CPU time of the (single) benchmarking thread (time.thread_time),
best of a few repeats, with torch and numba single-threaded; CPU time rather than
wall time because the development machine is shared.

Same-run baselines: raw fp16 (KVC1 raw), lz4 and zstd over fp16 bytes, int8
(per-token absmax), KIVI-style 2/4-bit (group 32, keys per channel, values per
token, fp16 residual window of the last 128 tokens of the prefix).
LMCache's CacheGen codec is not measured: `pip install lmcache` (0.5.6) pins
numpy<=2.2.6, protobuf>=6.31 and grpcio==1.78, which would break this environment,
and its serde modules do not import without those dependencies.

    python bench/bench_codec.py                  # 2 prompts, all levels + baselines
    python bench/bench_codec.py --prompts 4 --repeat 1   # Δppl over 4 prompts
    python bench/bench_codec.py --smoke          # tiny synthetic run, no model
"""

from __future__ import annotations

import argparse
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
# (character offset into the sample text, prefix tokens); calibration (`kvstore
# calibrate`) reads text at calibrate.SAMPLE_OFFSETS, which none of these overlaps.
PROMPTS = ((0, 1024), (150_000, 2048), (250_000, 1024), (350_000, 2048))
# Held-out texts (kvstore.models.smollm2.TEXTS): neither calibration nor the codec's
# tuning read them. "code": argparse.py; "prose": CPython's LICENSE.txt (~3.8K tokens).
HELD_OUT_PROMPTS = {"code": ((0, 1024), (40_000, 2048), (70_000, 1024), (20_000, 2048)),
                    "prose": ((0, 1024), (6_000, 1024), (3_000, 1024), (9_000, 1024))}
Codec = tuple[Callable[[np.ndarray], Any], Callable[[Any], np.ndarray], Callable[[Any], int]]


def kivi_codec(bits: int, group: int = 32, window: int = 128) -> Codec:
    """KIVI-style: keys per channel over groups of ``group`` tokens, values per token in
    groups of ``group`` channels; asymmetric, fp16 scale + zero. The newest chunk
    keeps its last ``window`` tokens in fp16 (KIVI's residual), charged at 16 bits."""
    top = (1 << bits) - 1

    def quant(x: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        lo = x.min(axis=axis, keepdims=True).astype(np.float16).astype(np.float32)
        hi = x.max(axis=axis, keepdims=True)
        scale = np.maximum((hi - lo) / top, 1e-8).astype(np.float16).astype(np.float32)
        return np.clip(np.rint((x - lo) / scale), 0, top).astype(np.uint8), lo, scale

    def encode(kv: np.ndarray, is_last: bool = False) -> Any:
        x = kv.astype(np.float32)
        layers, _, heads, tokens, dim = x.shape
        keep = window if is_last else 0
        k = x[:, 0].reshape(layers, heads, tokens // group, group, dim)
        v = x[:, 1].reshape(layers, heads, tokens, dim // group, group)
        return quant(k, 3), quant(v, 4), x.shape, kv[:, :, :, tokens - keep :].copy()

    def decode(enc: Any) -> np.ndarray:
        (kq, klo, ks), (vq, vlo, vs), shape, residual = enc
        k = (kq * ks + klo).reshape(shape[0], shape[2], shape[3], shape[4])
        v = (vq * vs + vlo).reshape(shape[0], shape[2], shape[3], shape[4])
        out = np.stack([k, v], axis=1).astype(np.float16)
        if residual.shape[3]:
            out[:, :, :, -residual.shape[3] :] = residual
        return out

    def size(enc: Any) -> int:
        (kq, _, _), (vq, _, _), _, residual = enc
        n = kq.size + vq.size - residual.size
        return n * bits // 8 + (n // group) * 2 * 2 + residual.nbytes

    return encode, decode, size


def int8_codec() -> Codec:
    def encode(kv: np.ndarray, is_last: bool = False) -> Any:
        x = kv.astype(np.float32)
        s = np.maximum(np.abs(x).max(axis=-1, keepdims=True), 1e-8).astype(np.float16)
        return np.rint(x / s.astype(np.float32) * 127).astype(np.int8), s

    def decode(enc: Any) -> np.ndarray:
        q, s = enc
        return (q.astype(np.float32) * (s.astype(np.float32) / 127)).astype(np.float16)

    return encode, decode, lambda enc: enc[0].nbytes + enc[1].nbytes


def bytes_codec(compress: Callable[[bytes], bytes], decompress: Callable[[bytes], bytes],
                shape_dtype: tuple[tuple[int, ...], Any]) -> Codec:
    shape, dtype = shape_dtype
    return (lambda kv, is_last=False: compress(kv.tobytes()),
            lambda b: np.frombuffer(decompress(b), dtype=dtype).reshape(shape), len)


def methods(layout: KVLayout, table_of: Callable[[np.ndarray], Any] | None) -> dict[str, Codec]:
    """The methods compared; ``table_of`` (chunk -> calibration table) adds the
    ``kvq:<level>+cal`` rows."""
    import lz4.frame
    import zstandard

    from kvstore import codec

    out: dict[str, Codec] = {}
    shape = (layout.chunk_shape, np.float16)
    zc, zd = zstandard.ZstdCompressor(level=3), zstandard.ZstdDecompressor()
    out["fp16+lz4"] = bytes_codec(lz4.frame.compress, lz4.frame.decompress, shape)
    out["fp16+zstd3"] = bytes_codec(zc.compress, zd.decompress, shape)
    out["int8"] = int8_codec()
    out["kivi4"] = kivi_codec(4)
    out["kivi2"] = kivi_codec(2)
    for name in codec.LEVELS:
        out[f"kvq:{name}"] = (lambda kv, last=False, n=name: codec.encode(kv, layout, n),
                              lambda b: codec.decode(b).numpy(), len)
        if table_of is not None and name != "raw":
            out[f"kvq:{name}+cal"] = (
                lambda kv, last=False, n=name: codec.encode(kv, layout, n, table=table_of(kv)),
                lambda b: codec.decode(b).numpy(), len)
    return out


def table_source(spec: str, layout: KVLayout) -> Callable[[np.ndarray], Any] | None:
    """--table: "none"; "auto" (what a client of namespace "smollm2-135m" gets:
    the user's table, else the shipped one); "stats" (what an unknown model gets:
    the statistics-only table of its first chunks); or a table path / id."""
    from kvstore.codec import autocal
    from kvstore.codec.calibrate import load_table

    if spec == "none":
        return None
    if spec in ("auto", "stats"):
        chooser = autocal.AutoCalibration()
        model = "smollm2-135m" if spec == "auto" else "unknown-model"
        return lambda kv: chooser.table_for(model, layout, kv)
    table = load_table(spec)
    return lambda kv: table


def run_method(codec: Codec, chunks: list[np.ndarray], repeat: int) -> dict[str, Any]:
    encode, decode, size = codec
    def encode_all() -> list[Any]:
        return [encode(c, i == len(chunks) - 1) for i, c in enumerate(chunks)]

    encoded = encode_all()  # warm-up (numba compile, caches)
    decoded = [decode(e) for e in encoded]
    enc_s = dec_s = float("inf")
    for _ in range(repeat):
        t0 = time.thread_time()
        encoded = encode_all()
        t1 = time.thread_time()
        decoded = [decode(e) for e in encoded]
        t2 = time.thread_time()
        enc_s, dec_s = min(enc_s, t1 - t0), min(dec_s, t2 - t1)
    nbytes = sum(c.nbytes for c in chunks)
    elements = sum(c.size for c in chunks)
    return {"bits_per_element": 8 * sum(size(e) for e in encoded) / elements,
            "encode_mb_s": nbytes / enc_s / 1e6, "decode_mb_s": nbytes / dec_s / 1e6,
            "decoded": decoded}


def perplexity_run(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    import torch

    from kvstore.codec.calibrate_model import continuation_logprobs, prefill
    from kvstore.models.smollm2 import load_smollm2, sample_tokens

    torch.set_num_threads(1)
    model, tokenizer = load_smollm2()
    results: dict[str, list[dict[str, Any]]] = {}
    prompts = PROMPTS if args.text == "pydoc" else HELD_OUT_PROMPTS[args.text]
    for offset, prefix in prompts[: args.prompts]:
        ids = sample_tokens(tokenizer, prefix + args.eval_tokens + 1, offset, args.text)
        exact = prefill(model, ids, prefix)
        layout = KVLayout(exact.shape[0], exact.shape[2], exact.shape[4], "float16", CHUNK)
        ref = continuation_logprobs(model, exact, ids, prefix, args.eval_tokens + 1)
        targets = torch.tensor(ids[prefix + 1 : prefix + args.eval_tokens + 1])

        def nll(logp: Any, targets: Any = targets) -> float:
            return float(-logp[:-1].gather(1, targets[:, None]).mean())

        base = nll(ref)
        fp16 = exact.astype(np.float16)
        chunks = [np.ascontiguousarray(fp16[:, :, :, t : t + CHUNK])
                  for t in range(0, prefix, CHUNK)]
        for name, codec in methods(layout, table_source(args.table, layout)).items():
            if args.only and not any(s in name for s in args.only.split(",")):
                continue
            res = run_method(codec, chunks, args.repeat)
            kv = np.concatenate(res.pop("decoded"), axis=3).astype(np.float32)
            logp = continuation_logprobs(model, kv, ids, prefix, args.eval_tokens + 1)
            row = {"text": args.text, "table": args.table, "prompt_offset": offset,
                   "prefix_tokens": prefix,
                   "dppl_pct": round(100 * (np.exp(nll(logp) - base) - 1), 3),
                   "base_ppl": round(float(np.exp(base)), 4),
                   **{k: round(v, 4) for k, v in res.items()}}
            results.setdefault(name, []).append(row)
            emit("codec", name, eval_tokens=args.eval_tokens, chunk_tokens=CHUNK, **row)
    return results


def emit_summary(results: dict[str, list[dict[str, Any]]]) -> None:
    """One line per method: means over prompts (bits weighted by tokens)."""
    for name, rows in results.items():
        tokens = sum(r["prefix_tokens"] for r in rows)
        emit("codec", name, summary=True, prompts=len(rows),
             bits_per_element=round(sum(r["bits_per_element"] * r["prefix_tokens"]
                                        for r in rows) / tokens, 4),
             dppl_pct_mean=round(float(np.mean([r["dppl_pct"] for r in rows])), 3),
             dppl_pct_max=round(max(r["dppl_pct"] for r in rows), 3),
             encode_mb_s=round(float(np.mean([r["encode_mb_s"] for r in rows])), 1),
             decode_mb_s=round(float(np.mean([r["decode_mb_s"] for r in rows])), 1))


def smoke_run(args: argparse.Namespace) -> None:
    rng = np.random.default_rng(0)
    layout = KVLayout(2, 2, 64, "float16", CHUNK)
    kv = (rng.standard_normal(layout.chunk_shape) * [[[[[1.0]]], [[[0.3]]]]]).astype(np.float16)
    for name, codec in methods(layout, None).items():
        res = run_method(codec, [kv], 1)
        err = float(np.abs(res.pop("decoded")[0].astype(np.float32) - kv).max())
        emit("codec", name, smoke=True, max_abs_error=err,
             **{k: round(v, 4) for k, v in res.items()})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny synthetic run without the model")
    p.add_argument("--prompts", type=int, default=2, choices=range(1, len(PROMPTS) + 1),
                   help="prompts (alternately 1K and 2K-token prefixes)")
    p.add_argument("--text", default="pydoc", choices=("pydoc", "code", "prose"),
                   help="pydoc: the bench prompts; code / prose: held-out texts")
    p.add_argument("--eval-tokens", type=int, default=512)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--table", default="auto", help="+cal rows: 'auto' (default: the table a "
                   "client gets for smollm2-135m: the user's newest, else the shipped one), "
                   "'stats' (the statistics-only table an unknown model gets), a table path "
                   "or id, or 'none'")
    p.add_argument("--only", default=None, help="comma-separated substrings of method names")
    args = p.parse_args(argv)
    import numba
    import torch

    torch.set_num_threads(1)
    numba.set_num_threads(1)
    if args.smoke:
        smoke_run(args)
        return 0
    emit_summary(perplexity_run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
