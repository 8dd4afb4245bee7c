"""RAG chunk-cache reuse on SmolLM2-135M (CPU): TTFT, top-1 agreement and KL vs a full prefill.

Each prompt is ``prefix + N retrieved passages + question`` (``--chunks``,
``--chunk-tokens``; prompt sets in ``_rag_prompts.py``: ``bench``, the set the
methods were tuned on, ``held-out`` and ``stdlib``, never used for tuning). The
reference is a full prefill of the prompt and its greedy answer (``--answer-tokens``).
Every method first stores the chunks (untimed), then builds the cache from the store
(timed: that is its TTFT) and is teacher-forced through the reference answer; at each
position its top-1 next token is compared with the reference's, over all positions
(the headline) and over the positions where the reference's top-1/top-2 margin is at
least ``--margin`` logits (not near-ties), and KL(reference || method) is taken.

Methods: ``build_cache`` at fixed recompute ratios (``--ratios``, rows
``blend-<ratio>``), adaptive within a TTFT budget (``--min-speedups``, rows
``adaptive-<min_speedup>``), for each ``--leads`` variant (what a missing chunk is
computed after: ``prefix``, the default, or ``none``, ``nl``, ``doc``, ``bos``,
``endoftext``) and each client ``--codecs`` (how chunks are stored: ``raw``, or a kvq
level), and the naive baseline (chunk caches concatenated, no rotation, no recompute).
The full prefill is timed next to each method on the same prompt, so speedups are
per-prompt ratios (median reported). One JSON line per method.

    python bench/bench_rag.py                          # 8 prompts, ratios 0.05,0.15,0.30
    python bench/bench_rag.py --prompts 1 --chunk-tokens 64 --answer-tokens 4   # smoke
    python bench/bench_rag.py --prompt-set stdlib      # prompts nothing was tuned on
    python bench/bench_rag.py --ratios 0.15 --min-speedups 2.5,3,4   # adaptive vs fixed
    python bench/bench_rag.py --codecs raw,high,balanced   # chunks stored compressed
    python bench/bench_rag.py --query-aware            # build_cache(query_aware=True)
    python bench/bench_rag.py --leads prefix,none      # chunk_lead variants in one run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import daemon, emit  # noqa: E402
from _rag_prompts import PROMPT_SETS, make_prompts  # noqa: E402

from kvstore import Client  # noqa: E402
from kvstore._progress import track  # noqa: E402
from kvstore.models.arch import layout_for  # noqa: E402
from kvstore.models.smollm2 import load_smollm2  # noqa: E402
from kvstore.rag import budget, build_cache, build_cache_naive  # noqa: E402

# --leads: what a missing chunk is computed after (build_cache's chunk_lead).
LEADS = {
    "none": lambda tok, prompt: [],
    "endoftext": lambda tok, prompt: [0],
    "bos": lambda tok, prompt: [tok.bos_token_id],
    "nl": lambda tok, prompt: tok("\n\n")["input_ids"],
    "doc": lambda tok, prompt: tok("Document:\n")["input_ids"],
    "prefix": lambda tok, prompt: None,  # build_cache's default: the prompt's prefix
}


@dataclass(frozen=True, slots=True)
class Method:
    """One way to build the cache."""

    ratio: float | None  # fixed recompute ratio; None: adaptive, or naive
    min_speedup: float | None  # adaptive's TTFT budget; None: fixed ratio, or naive
    lead: str = "prefix"  # a LEADS name
    codec: str = "raw"  # the client's codec: how chunks are stored

    @property
    def is_naive(self) -> bool:
        return self.ratio is None and self.min_speedup is None

    @property
    def name(self) -> str:
        if self.is_naive:
            return "naive-concat"
        base = (
            f"blend-{self.ratio:g}" if self.ratio is not None else f"adaptive-{self.min_speedup:g}"
        )
        lead = "" if self.lead == "prefix" else f"-lead-{self.lead}"
        codec = "" if self.codec == "raw" else f"-{self.codec}"
        return base + lead + codec


def _timed(fn) -> tuple[Any, tuple[float, float]]:
    """(result, (wall seconds, CPU seconds of this process: all its threads, not the daemon))."""
    start, start_cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, (time.perf_counter() - start, time.process_time() - start_cpu)


@torch.inference_mode()
def reference(model: Any, prompt: dict, answer_tokens: int) -> tuple[list[int], torch.Tensor]:
    """Greedy answer of the full prefill and its next-token logits ``[answer, vocab]``."""
    ids = prompt["prefix"] + sum(prompt["chunks"], []) + prompt["query"]
    out = model.generate(
        torch.tensor([ids]),
        max_new_tokens=answer_tokens,
        min_new_tokens=answer_tokens,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    answer = out.sequences[0, len(ids) :].tolist()
    return answer, torch.stack(out.logits, dim=1)[0].float()


@torch.inference_mode()
def _continue(model: Any, cache: Any, logits: torch.Tensor, answer: list[int]) -> torch.Tensor:
    if len(answer) == 1:
        return logits[None]
    out = model(input_ids=torch.tensor([answer[:-1]]), cache=cache, use_cache=True)
    return torch.cat((logits[None], out.logits[0].float()))


@torch.inference_mode()
def _full_prefill(model: Any, prompt: dict) -> None:
    ids = prompt["prefix"] + sum(prompt["chunks"], []) + prompt["query"]
    model(input_ids=torch.tensor([ids]), use_cache=True, logits_to_keep=1)


def run_method(
    model: Any, client: Client, prompt: dict, method: Method, lead: Any, query_aware: bool
) -> tuple:
    """(cache, logits, (ttft wall s, ttft CPU s), stats or None) of one method."""
    args = (model, client, prompt["chunks"], prompt["query"])
    if method.is_naive:
        build_cache_naive(*args, prefix=prompt["prefix"])  # stores the chunks, untimed
        (cache, logits), ttft = _timed(lambda: build_cache_naive(*args, prefix=prompt["prefix"]))
        return cache, logits, ttft, None
    kwargs = {
        "prefix": prompt["prefix"],
        "recompute_ratio": method.ratio,
        "min_speedup": method.min_speedup or budget.DEFAULT_MIN_SPEEDUP,
        "query_aware": query_aware,
        "chunk_lead": lead,
    }
    build_cache(*args, **kwargs)
    (cache, logits, stats), ttft = _timed(lambda: build_cache(*args, **kwargs))
    return cache, logits, ttft, stats


def summarize(method: Method, results: list[dict], extra: dict) -> None:
    agree = [a for r in results for a in r["agree"]]
    confident = [
        a
        for r in results
        for a, m in zip(r["agree"], r["margin"], strict=True)
        if m >= extra["margin"]
    ]
    stats = [r["stats"] for r in results if r["stats"] is not None]
    chosen = {}
    if stats:
        chosen = {
            "recompute_ratio": statistics.fmean(s.recompute_ratio for s in stats),
            "recompute_ratios": [round(s.recompute_ratio, 4) for s in stats],
            "max_recompute_ratio": statistics.fmean(s.max_recompute_ratio for s in stats),
            "predicted_speedup": statistics.median(s.predicted_speedup for s in stats),
        }
    emit(
        "rag",
        method.name,
        ttft_s=statistics.median(r["ttft_s"][0] for r in results),
        full_prefill_s=statistics.median(r["full_s"][0] for r in results),
        speedup=statistics.median(r["full_s"][0] / r["ttft_s"][0] for r in results),
        # Less sensitive to other load on a shared machine than the wall-clock ratio.
        cpu_speedup=statistics.median(r["full_s"][1] / r["ttft_s"][1] for r in results),
        top1_agreement=sum(agree) / len(agree),
        num_positions=len(agree),
        # Positions where the full prefill's top-1 leads its top-2 by >= margin logits.
        top1_agreement_confident=sum(confident) / max(1, len(confident)),
        num_confident_positions=len(confident),
        mean_kl=statistics.fmean(r["kl"] for r in results),
        min_speedup=method.min_speedup,
        fixed_ratio=method.ratio,
        chunk_lead=method.lead,
        codec=method.codec,
        torch_threads=torch.get_num_threads(),
        **chosen,
        **extra,
    )


def evaluate(
    model: Any, tokenizer: Any, clients: dict, prompt: dict, methods: list, args: Any
) -> dict:
    """Per method: TTFT, the full prefill timed next to it, KL and top-1 agreement on one
    prompt, with the reference's top-1/top-2 margin at each position."""
    answer, ref = reference(model, prompt, args.answer_tokens)
    top2 = ref.topk(2, dim=-1).values
    margin = (top2[:, 0] - top2[:, 1]).tolist()
    rows = {}
    for method in methods:
        lead = LEADS[method.lead](tokenizer, prompt)
        _, full_s = _timed(lambda: _full_prefill(model, prompt))
        cache, logits, ttft, stats = run_method(
            model, clients[method.codec], prompt, method, lead, args.query_aware
        )
        got = _continue(model, cache, logits, answer)
        kl = F.kl_div(
            F.log_softmax(got, -1),
            F.log_softmax(ref, -1),
            log_target=True,
            reduction="batchmean",
        ).item()
        agree = (got.argmax(-1) == ref.argmax(-1)).tolist()
        rows[method] = {
            "ttft_s": ttft,
            "full_s": full_s,
            "kl": kl,
            "stats": stats,
            "agree": agree,
            "margin": margin,
        }
    return rows


def _methods(args: Any, parser: argparse.ArgumentParser) -> list[Method]:
    leads = args.leads.split(",")
    if unknown := set(leads) - set(LEADS):
        parser.error(f"unknown --leads {sorted(unknown)}; choose from {sorted(LEADS)}")
    ratios = [float(r) for r in args.ratios.split(",") if r]
    speedups = [float(r) for r in args.min_speedups.split(",") if r]
    methods = [
        Method(ratio, speedup, lead, codec)
        for codec in args.codecs.split(",")
        for lead in leads
        for ratio, speedup in [(r, None) for r in ratios] + [(None, m) for m in speedups]
    ]
    return methods + [Method(None, None, "none")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-set", default="bench", choices=PROMPT_SETS)
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--chunk-tokens", type=int, default=256)
    parser.add_argument("--answer-tokens", type=int, default=32)
    parser.add_argument("--ratios", default="0.05,0.15,0.30", help="fixed ratios ('' for none)")
    parser.add_argument("--min-speedups", default="", help="adaptive budgets, e.g. 2.5,3,4")
    parser.add_argument("--codecs", default="raw", help="client codecs: raw or kvq levels")
    parser.add_argument("--margin", type=float, default=1.0, help="logits; see the docstring")
    parser.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="override kvstore.rag.budget.DEVIATION_THRESHOLD (tune on --prompt-set bench only)",
    )
    parser.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch default")
    parser.add_argument("--query-aware", action="store_true", help="build_cache(query_aware=True)")
    parser.add_argument(
        "--leads", default="prefix", help=f"comma-separated chunk_lead variants of {sorted(LEADS)}"
    )
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.threshold is not None:
        budget.DEVIATION_THRESHOLD = args.threshold
    methods = _methods(args, parser)
    model, tokenizer = load_smollm2()
    prompts = make_prompts(tokenizer, args.prompt_set, args.prompts, args.chunks, args.chunk_tokens)
    results: dict[Method, list[dict]] = {m: [] for m in methods}
    with tempfile.TemporaryDirectory() as tmp, daemon(Path(tmp) / "data") as address:
        layout = layout_for(model, args.dtype, 256)
        codecs = sorted({m.codec for m in methods})
        clients = {
            c: Client(address, f"bench-rag-{c}", layout, timeout_s=300, codec=c) for c in codecs
        }
        try:
            for prompt in track(prompts, "bench_rag: prompts"):
                rows = evaluate(model, tokenizer, clients, prompt, methods, args)
                for method, row in rows.items():
                    results[method].append(row)
        finally:
            for client in clients.values():
                client.close()
    shape = {
        "prompts": args.prompts,
        "prompt_set": args.prompt_set,
        "chunks": args.chunks,
        "chunk_tokens": args.chunk_tokens,
        "answer_tokens": args.answer_tokens,
        "margin": args.margin,
        "deviation_threshold": budget.DEVIATION_THRESHOLD,
        "query_aware": args.query_aware,
        "dtype": args.dtype,
        "prompt_tokens": len(prompts[0]["prefix"])
        + args.chunks * args.chunk_tokens
        + len(prompts[0]["query"]),
    }
    for method in methods:
        summarize(method, results[method], shape)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
