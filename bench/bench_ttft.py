"""Time to first token with a cached prefix vs a full prefill, SmolLM2-135M on the CPU.

For each codec in ``--codecs`` and each context length, the prompt is that many
cached tokens plus a ``--tail`` of new ones (default 16). Its full chunks are
stored once through a `kvstore serve` subprocess, then, alternating so all see
the same machine load: a full prefill of the prompt (the baseline),
``kvstore.integrations.transformers.prefill`` loading the stored prefix and running
the tail (``cached_ttft_s``), and the *ideal*: the tail's own forward over a cache
already in memory (``ideal_ttft_s``; the cache is rebuilt untimed before each run).
``of_ideal`` = ideal / cached TTFT: how close the load path (get, dtype
conversion, cache construction; ``load_s`` alone) comes to costing nothing. TTFT
is the median over ``--repeat`` runs. One JSON line per length, and a PNG plot.

    python bench/bench_ttft.py                              # 512..4096, raw + balanced
    python bench/bench_ttft.py --dtype float32              # exact (float32) store
    python bench/bench_ttft.py --sizes 256 --repeat 1 --no-plot   # smoke size
    python bench/bench_ttft.py --sizes 2048 --codecs raw --repeat 5 --no-plot --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import daemon, emit  # noqa: E402

from kvstore import Client  # noqa: E402
from kvstore._progress import track  # noqa: E402
from kvstore.integrations.transformers import (  # noqa: E402
    cache_from_kv,
    kv_from_cache,
    layout_for,
    load_prefix,
    prefill,
)
from kvstore.models.smollm2 import load_smollm2, sample_tokens  # noqa: E402

DEFAULT_PLOT = Path(__file__).resolve().parent / "ttft.png"


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@torch.inference_mode()
def _full_prefill(model, ids: list[int]) -> None:
    model(input_ids=torch.tensor([ids]), use_cache=True, logits_to_keep=1)


@torch.inference_mode()
def _ideal(model, prefix_kv: torch.Tensor, tail: list[int]) -> float:
    """Seconds of the tail's forward over a cache already in memory (built untimed)."""
    cache = cache_from_kv(model, prefix_kv)
    rest = torch.tensor([tail])
    return _timed(lambda: model(input_ids=rest, cache=cache, use_cache=True, logits_to_keep=1))


def measure(model, client: Client, ids: list[int], num_cached: int,
            repeat: int) -> dict[str, float]:
    """Median TTFT of a full prefill, a cached-prefix prefill and the ideal, for ``ids``."""
    cold_s = _timed(lambda: prefill(model, ids, client))  # computes and stores the chunks
    cache, _, num_reused = prefill(model, ids, client)  # warm-up of the load path
    # The ideal's cache holds exactly what a load gives: the stored prefix, model dtype.
    prefix_kv = kv_from_cache(cache, 0, num_reused, next(model.parameters()).dtype)
    del cache
    tail = ids[num_reused:]
    full, cached, ideal, get, load = [], [], [], [], []
    for _ in range(repeat):
        full.append(_timed(lambda: _full_prefill(model, ids)))
        cached.append(_timed(lambda: prefill(model, ids, client)))
        ideal.append(_ideal(model, prefix_kv, tail))
        get.append(_timed(lambda: client.get(ids[:num_cached])))
        load.append(_timed(lambda: load_prefix(model, client, ids)))
    row = {
        "full_prefill_s": statistics.median(full),
        "cached_ttft_s": statistics.median(cached),
        "ideal_ttft_s": statistics.median(ideal),
        "get_s": statistics.median(get),
        "load_s": statistics.median(load),
        "cold_prefill_and_put_s": cold_s,
        "num_reused": num_reused,
        "tail_tokens": len(tail),
    }
    row["speedup"] = row["full_prefill_s"] / row["cached_ttft_s"]
    row["ideal_speedup"] = row["full_prefill_s"] / row["ideal_ttft_s"]
    row["of_ideal"] = row["ideal_ttft_s"] / row["cached_ttft_s"]
    return row


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    codecs = list(dict.fromkeys(r["codec"] for r in rows))
    first = [r for r in rows if r["codec"] == codecs[0]]
    sizes = [r["context_tokens"] for r in first]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(sizes, [r["full_prefill_s"] for r in first], "o-", label="full prefill")
    for codec, marker in zip(codecs, "sdv^", strict=False):
        mine = [r for r in rows if r["codec"] == codec]
        ax.plot([r["context_tokens"] for r in mine], [r["cached_ttft_s"] for r in mine],
                f"{marker}-", label=f"cached prefix ({mine[0]['dtype']}, {codec})")
        for r in mine:
            ax.annotate(f"{r['speedup']:.0f}x", (r["context_tokens"], r["cached_ttft_s"]),
                        textcoords="offset points", xytext=(0, 8), ha="center", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_xlabel("context tokens")
    ax.set_ylabel("time to first token (s)")
    ax.set_title("SmolLM2-135M on CPU: TTFT, kvstore prefix reuse vs prefill")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="512,1024,2048,4096", help="context lengths (tokens)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--dtype",
        default="float16",
        choices=["float16", "float32"],
        help="stored KV dtype (client layout)",
    )
    parser.add_argument("--chunk-tokens", type=int, default=256)
    parser.add_argument("--tail", type=int, default=16,
                        help="new tokens after the cached context (the prompt's tail)")
    parser.add_argument("--codecs", default="raw,balanced",
                        help="comma-separated codec levels (kvstore.codec.LEVELS)")
    parser.add_argument("--plot", type=Path, default=DEFAULT_PLOT, help="PNG path")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch default")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    model, tokenizer = load_smollm2()
    ids_all = sample_tokens(tokenizer, max(sizes) + args.tail, offset=0)
    layout = layout_for(model, args.dtype, args.chunk_tokens)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, daemon(Path(tmp) / "data") as address:
        for codec in args.codecs.split(","):
            # Keys do not depend on the codec: one namespace per codec keeps them apart.
            with Client(address, f"bench-ttft-{codec}", layout, timeout_s=120,
                        codec=codec) as client:
                for size in track(sizes, f"bench_ttft: {codec}"):
                    row = {
                        "context_tokens": size,
                        "dtype": args.dtype,
                        "codec": codec,
                        "chunk_tokens": args.chunk_tokens,
                        **measure(model, client, ids_all[:size + args.tail], size,
                                  args.repeat),
                    }
                    rows.append(row)
                    emit("ttft", f"smollm2-{size}-{codec}",
                         torch_threads=torch.get_num_threads(), **row)
    if not args.no_plot:
        plot(rows, args.plot)
        print(f"# plot: {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
