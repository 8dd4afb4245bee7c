"""RAG chunk-cache reuse on SmolLM2-135M (CPU): TTFT, top-1 agreement and KL vs a full prefill.

Each prompt is ``prefix + 4 retrieved chunks (256 tokens each, pydoc_data.topics
passages) + question``. The reference is a full prefill of the prompt and 32
greedy answer tokens from it. Every method first stores the chunks (untimed),
then builds the cache from the store (timed: that is its TTFT) and is
teacher-forced through the reference answer; at each of the 32 positions its
top-1 next token is compared with the reference and KL(reference || method) is
taken. Methods: ``kvstore.rag.build_cache`` at three recompute ratios for each
``--leads`` variant (what a missing chunk is computed after: ``prefix``, the
default, or ``none``, ``nl``, ``doc``, ``bos``, ``endoftext``; rows named
``blend-lead-<lead>-<ratio>``, the default ``blend-<ratio>``) and the naive
baseline (chunk caches concatenated, no rotation, no recompute). The full prefill
is timed next to each method on the same prompt, so speedups are per-prompt
ratios (median reported). One JSON line per method.

    python bench/bench_rag.py                          # 8 prompts, ratios 0.05,0.15,0.30
    python bench/bench_rag.py --prompts 1 --chunk-tokens 64 --answer-tokens 4   # smoke
    python bench/bench_rag.py --held-out               # prompts the selection was not tuned on
    python bench/bench_rag.py --query-aware            # build_cache(query_aware=True)
    python bench/bench_rag.py --leads prefix,none      # chunk_lead variants in one run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import daemon, emit  # noqa: E402

from kvstore import Client  # noqa: E402
from kvstore._progress import track  # noqa: E402
from kvstore.models.arch import layout_for  # noqa: E402
from kvstore.models.smollm2 import load_smollm2  # noqa: E402
from kvstore.rag import build_cache, build_cache_naive  # noqa: E402

PREFIX = "You are a helpful assistant. Answer the question using the documentation below.\n\n"
QUESTION = "\n\nQuestion: According to the documentation above, what is '{topic}' about?\nAnswer:"
# --held-out: prompts the methods were not tuned on (other passages, offsets and wording).
HELD_OUT_PREFIX = "Use the following reference material to answer.\n\n"
HELD_OUT_QUESTION = "\n\nQ: Explain '{topic}' based on the text above.\nA:"
HELD_OUT_OFFSET = 128  # tokens skipped at the start of each passage
# --leads: what a missing chunk is computed after (build_cache's chunk_lead).
LEADS = {
    "none": lambda tok, prompt: [],
    "endoftext": lambda tok, prompt: [0],
    "bos": lambda tok, prompt: [tok.bos_token_id],
    "nl": lambda tok, prompt: tok("\n\n")["input_ids"],
    "doc": lambda tok, prompt: tok("Document:\n")["input_ids"],
    "prefix": lambda tok, prompt: None,  # build_cache's default: the prompt's prefix
}


def make_prompts(
    tokenizer: Any, num_prompts: int, num_chunks: int, chunk_tokens: int, held_out: bool = False
) -> list[dict]:
    """Prompts of distinct pydoc topics; each topic's first ``chunk_tokens`` tokens is one chunk.

    ``held_out`` takes tokens ``HELD_OUT_OFFSET..`` of each topic instead, topics in
    reverse order, another prefix and question.
    """
    from pydoc_data.topics import topics

    offset = HELD_OUT_OFFSET if held_out else 0
    passages = []
    for name in sorted(topics, reverse=held_out):
        ids = tokenizer(topics[name])["input_ids"]
        if len(ids) >= offset + chunk_tokens:
            passages.append((name, ids[offset : offset + chunk_tokens]))
    step = max(1, len(passages) // (num_prompts * num_chunks))
    prefix = tokenizer(HELD_OUT_PREFIX if held_out else PREFIX)["input_ids"]
    question = HELD_OUT_QUESTION if held_out else QUESTION
    shift = 3 if held_out else 0  # held-out: other passages, and ask about another chunk
    prompts = []
    for p in range(num_prompts):
        picked = [
            passages[((p * num_chunks + c) * step + shift) % len(passages)]
            for c in range(num_chunks)
        ]
        topic = picked[(p + held_out) % num_chunks][0]
        query = tokenizer(question.format(topic=topic))["input_ids"]
        prompts.append({"prefix": prefix, "chunks": [ids for _, ids in picked], "query": query})
    return prompts


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
    model: Any,
    client: Client,
    prompt: dict,
    ratio: float | None,
    query_aware: bool = False,
    lead: list[int] | None = None,
) -> tuple:
    """(cache, logits, (ttft wall s, ttft CPU s), stats) of one method; ``ratio=None``: naive."""
    args = (model, client, prompt["chunks"], prompt["query"])
    if ratio is None:
        build_cache_naive(*args, prefix=prompt["prefix"])  # stores the chunks, untimed
        (cache, logits), ttft = _timed(lambda: build_cache_naive(*args, prefix=prompt["prefix"]))
        return cache, logits, ttft, None
    kwargs = {
        "prefix": prompt["prefix"],
        "recompute_ratio": ratio,
        "query_aware": query_aware,
        "chunk_lead": lead,
    }
    build_cache(*args, **kwargs)
    (cache, logits, stats), ttft = _timed(lambda: build_cache(*args, **kwargs))
    return cache, logits, ttft, stats


def summarize(name: str, results: list[dict], extra: dict) -> None:
    agree = [a for r in results for a in r["agree"]]
    emit(
        "rag",
        name,
        ttft_s=statistics.median(r["ttft_s"][0] for r in results),
        full_prefill_s=statistics.median(r["full_s"][0] for r in results),
        speedup=statistics.median(r["full_s"][0] / r["ttft_s"][0] for r in results),
        # Less sensitive to other load on a shared machine than the wall-clock ratio.
        cpu_speedup=statistics.median(r["full_s"][1] / r["ttft_s"][1] for r in results),
        top1_agreement=sum(agree) / len(agree),
        num_positions=len(agree),
        mean_kl=statistics.fmean(r["kl"] for r in results),
        torch_threads=torch.get_num_threads(),
        **extra,
    )


def evaluate(
    model: Any, tokenizer: Any, client: Client, prompt: dict, methods: list, args: Any
) -> dict:
    """Per method ``(lead name, ratio)``: TTFT, the full prefill timed next to it, KL and
    top-1 agreement on one prompt."""
    answer, ref = reference(model, prompt, args.answer_tokens)
    rows = {}
    for method in methods:
        lead_name, ratio = method
        lead = LEADS[lead_name](tokenizer, prompt)
        _, full_s = _timed(lambda: _full_prefill(model, prompt))
        cache, logits, ttft, stats = run_method(
            model, client, prompt, ratio, args.query_aware, lead
        )
        got = _continue(model, cache, logits, answer)
        kl = F.kl_div(
            F.log_softmax(got, -1),
            F.log_softmax(ref, -1),
            log_target=True,
            reduction="batchmean",
        ).item()
        agree = (got.argmax(-1) == ref.argmax(-1)).tolist()
        rows[method] = {"ttft_s": ttft, "full_s": full_s, "kl": kl, "stats": stats, "agree": agree}
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--chunk-tokens", type=int, default=256)
    parser.add_argument("--answer-tokens", type=int, default=32)
    parser.add_argument("--ratios", default="0.05,0.15,0.30")
    parser.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch default")
    parser.add_argument("--held-out", action="store_true", help="prompts not used for tuning")
    parser.add_argument("--query-aware", action="store_true", help="build_cache(query_aware=True)")
    parser.add_argument(
        "--leads", default="prefix", help=f"comma-separated chunk_lead variants of {sorted(LEADS)}"
    )
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_smollm2()
    prompts = make_prompts(tokenizer, args.prompts, args.chunks, args.chunk_tokens, args.held_out)
    ratios = [float(r) for r in args.ratios.split(",")]
    leads = args.leads.split(",")
    if unknown := set(leads) - set(LEADS):
        parser.error(f"unknown --leads {sorted(unknown)}; choose from {sorted(LEADS)}")
    methods = [(lead, r) for lead in leads for r in ratios] + [("none", None)]
    results: dict[tuple, list[dict]] = {m: [] for m in methods}
    with tempfile.TemporaryDirectory() as tmp, daemon(Path(tmp) / "data") as address:
        with Client(
            address, "bench-rag", layout_for(model, args.dtype, 256), timeout_s=120
        ) as client:
            for prompt in track(prompts, "bench_rag: prompts"):
                rows = evaluate(model, tokenizer, client, prompt, methods, args)
                for method, row in rows.items():
                    results[method].append(row)
    shape = {
        "prompts": args.prompts,
        "chunks": args.chunks,
        "chunk_tokens": args.chunk_tokens,
        "answer_tokens": args.answer_tokens,
        "dtype": args.dtype,
        "held_out": args.held_out,
        "prompt_tokens": len(prompts[0]["prefix"])
        + args.chunks * args.chunk_tokens
        + len(prompts[0]["query"]),
    }
    for lead, ratio in methods:
        rs = results[(lead, ratio)]
        if ratio is None:
            summarize("naive-concat", rs, {"recompute_ratio": None, **shape})
            continue
        last = rs[-1]["stats"]
        qa = "-query-aware" if args.query_aware else ""
        summarize(
            f"blend{qa}{'' if lead == 'prefix' else '-lead-' + lead}-{ratio:g}",
            rs,
            {
                "recompute_ratio": ratio,
                "query_aware": args.query_aware,
                "chunk_lead": lead,
                "num_reused": last.num_reused,
                "num_recomputed": last.num_recomputed,
                "num_prefilled": last.num_prefilled,
                **shape,
            },
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
