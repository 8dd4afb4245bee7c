"""Sparse decode quality on SmolLM2: needle-in-a-haystack prompts from pydoc_data.topics.

For each prompt (one needle at one depth), the dense decode (same loop, exact
attention everywhere) is the same-run baseline. Each selector x budget is then
run teacher-forced on the dense answer tokens and reports: attention-mass recall
and oracle top-k overlap, attention-output relative error (sparse layers), next
token KL and top-1 agreement vs dense, needle exact match (dense and sparse),
bytes fetched per step vs the full KV, and the hit rate between steps. The
relative error is also reported per sparse layer (``rel_error_by_layer``).

    python bench/bench_sparse.py                  # ~7K-token prompts (slow on CPU)
    python bench/bench_sparse.py --smoke          # tiny, for the smoke test

Prefill captures are cached under --cache-dir (keyed by the prompt tokens).
No GPU here: step latency is not measured (see docs).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit  # noqa: E402

from kvstore._progress import track  # noqa: E402
from kvstore.models.arch import fingerprint_of  # noqa: E402
from kvstore.models.llama import capture_prefill  # noqa: E402
from kvstore.models.rope import rope_spec  # noqa: E402
from kvstore.models.smollm2 import load_smollm2, sample_text  # noqa: E402
from kvstore.sparse import (  # noqa: E402
    BlockGeometry,
    HostBlockPool,
    SparseConfig,
    SparseDecoder,
    build_sequence,
)
from kvstore.sparse.layers import SparseLayer  # noqa: E402
from kvstore.sparse.measure import ObservedLayer, kl_and_agreement  # noqa: E402

NEEDLES = [  # (statement, question, answer)
    ("The secret passcode for the blue vault is 48213.",
     "What is the secret passcode for the blue vault?",
     "The secret passcode for the blue vault is", "48213"),
    ("The name of the harbour master's parrot is Zephyrine.",
     "What is the name of the harbour master's parrot?",
     "The name of the harbour master's parrot is", "Zephyrine"),
    ("The launch code for the orange rocket is 90517.",
     "What is the launch code for the orange rocket?",
     "The launch code for the orange rocket is", "90517"),
]


def build_prompt(tokenizer, num_tokens: int, needle: int, depth: float) -> list[int]:
    statement, question, lead, _ = NEEDLES[needle]
    hay_ids = tokenizer(sample_text(num_tokens * 6, offset=20_000 * needle))["input_ids"]
    hay = tokenizer.decode(hay_ids[:num_tokens])
    cut = hay.rfind("\n", 0, int(len(hay) * depth)) + 1
    text = f"{hay[:cut]}\n{statement}\n{hay[cut:]}\nQuestion: {question}\nAnswer: {lead}"
    return tokenizer(text)["input_ids"]


def cached_prefill(model, prefix: list[int], cache_dir: Path):
    key = hashlib.sha256(repr(prefix).encode()).hexdigest()[:16]
    path = cache_dir / f"prefill-{key}.pt"
    if path.exists():
        return torch.load(path)
    start = time.perf_counter()
    k_pre, values = capture_prefill(model, torch.tensor(prefix))
    logging.info("prefill of %d tokens: %.1f s", len(prefix), time.perf_counter() - start)
    cache_dir.mkdir(parents=True, exist_ok=True)
    torch.save((k_pre, values), path)
    return k_pre, values


def make_decoder(model, cfg, k_pre, values, rope, fingerprint, observe: bool):
    num_layers, num_kv, n, dim = k_pre.shape
    geometry = BlockGeometry(num_layers, num_kv, dim, cfg.block_tokens, cfg.store_dtype)
    capacity = n // cfg.block_tokens + 8
    pool = HostBlockPool(geometry, capacity)
    bundle = build_sequence(k_pre, values, cfg, rope, fingerprint, pool, capacity)
    decoder = SparseDecoder(model, cfg, bundle, pool)
    if observe:
        first = bundle.num_blocks * cfg.block_tokens
        for i, state in enumerate(decoder.layers):
            if isinstance(state, SparseLayer):
                keys = torch.cat((state._load_exact(torch.arange(bundle.num_blocks)
                                                    .expand(num_kv, -1).contiguous())[0],
                                  state.recent_k[:, state.recent_k.shape[1] - (n - first):]), 1)
                full_v = values[i].float().clone()
                decoder.layers[i] = ObservedLayer(state, keys[:, :n], full_v)
    return decoder


def run_dense(model, cfg_dense, k_pre, values, rope, fp, first_token, num_new):
    decoder = make_decoder(model, cfg_dense, k_pre, values, rope, fp, observe=False)
    tokens, logits = [first_token], []
    for _ in range(num_new):
        out, _ = decoder.step(tokens[-1])
        logits.append(out)
        tokens.append(int(out.argmax()))
    return tokens, logits


def run_sparse(model, cfg, k_pre, values, rope, fp, dense_tokens, dense_logits):
    decoder = make_decoder(model, cfg, k_pre, values, rope, fp, observe=True)
    kls, agree, fetched, hits, misses = [], [], [], 0, 0
    steps = track(list(enumerate(dense_tokens[:-1])), "bench_sparse: decode")
    for step, token in steps:  # teacher-forced on the dense tokens
        logits, stats = decoder.step(token)
        kl, same = kl_and_agreement(dense_logits[step], logits)
        kls.append(kl)
        agree.append(same)
        sparse_stats = [s for s in stats if s is not None]
        fetched.append(sum(s.bytes_fetched for s in sparse_stats))
        if step:
            hits += sum(s.num_hits for s in sparse_stats)
            misses += sum(s.num_misses for s in sparse_stats)
    observed = {i: layer.records for i, layer in enumerate(decoder.layers)
                if isinstance(layer, ObservedLayer)}
    records = [r for layer_records in observed.values() for r in layer_records]
    return {"recall": statistics.mean(r.recall for r in records),
            "recall_min_layer_step": min(r.recall for r in records),
            "overlap": statistics.mean(r.overlap for r in records),
            "rel_error": statistics.mean(r.rel_error for r in records),
            "rel_error_max": max(r.rel_error for r in records),
            "rel_error_by_layer": {i: round(statistics.mean(r.rel_error for r in rs), 4)
                                   for i, rs in observed.items()},
            "kl": statistics.mean(kls), "top1": statistics.mean(agree), "all_top1": all(agree),
            "fetched_bytes_first": fetched[0], "fetched_bytes_mean": statistics.mean(fetched),
            "hit_rate": hits / max(1, hits + misses)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-tokens", type=int, default=7000)
    ap.add_argument("--prompts", default="0:0.2,1:0.5,2:0.8", help="needle:depth,...")
    ap.add_argument("--budgets", default="256,512,1024")
    ap.add_argument("--selectors", default="landmark,lowrank,two_stage")
    ap.add_argument("--new-tokens", type=int, default=7)
    ap.add_argument("--cache-dir", default="/tmp/kvstore-bench-sparse")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, one prompt")
    ap.add_argument("--rank", type=int, default=None, help="low-rank factor rank (default 1/4)")
    ap.add_argument("--exact-keys", action=argparse.BooleanOptionalAction, default=True,
                    help="fetch selected blocks' exact keys (--no-exact-keys: rebuild them "
                         "from the low-rank factors)")
    ap.add_argument("--summaries", action=argparse.BooleanOptionalAction, default=True,
                    help="attend unselected blocks through their landmark and mean value")
    ap.add_argument("--candidate-factor", type=int, default=8,
                    help="two-stage: landmark candidates per selected block")
    ap.add_argument("--outlier-blocks", type=int, default=4, help="exact outlier blocks per head")
    ap.add_argument("--local-blocks", type=int, default=4, help="exact local-window blocks")
    args = ap.parse_args(argv)
    if args.smoke:
        args.num_tokens, args.prompts, args.budgets, args.new_tokens = 600, "0:0.5", "128", 3
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(0)
    model, tokenizer = load_smollm2()
    spec = rope_spec(model)
    rope, fp = (spec.inv_freq, spec.attention_scaling), fingerprint_of(model)
    dense_cfg = SparseConfig(selector="dense")
    for spec in args.prompts.split(","):
        needle, depth = int(spec.split(":")[0]), float(spec.split(":")[1])
        ids = build_prompt(tokenizer, args.num_tokens, needle, depth)
        k_pre, values = cached_prefill(model, ids[:-1], Path(args.cache_dir))
        full_kv_bytes = len(ids) * k_pre.shape[0] * 2 * k_pre.shape[1] * k_pre.shape[3] * 2
        start = time.perf_counter()
        dense_tokens, dense_logits = run_dense(model, dense_cfg, k_pre, values, rope, fp,
                                               ids[-1], args.new_tokens)
        dense_s = time.perf_counter() - start
        answer = tokenizer.decode(dense_tokens[1:])
        dense_match = NEEDLES[needle][3] in answer
        common = {"needle": needle, "depth": depth, "prompt_tokens": len(ids)}
        emit("sparse", "dense", **common, answer=answer, needle_match=dense_match,
             step_s=dense_s / args.new_tokens, full_kv_bytes=full_kv_bytes)
        for selector in args.selectors.split(","):
            for budget in map(int, args.budgets.split(",")):
                cfg = SparseConfig(budget_tokens=budget, selector=selector, rank=args.rank,
                                   exact_keys=args.exact_keys,
                                   summarize_unselected=args.summaries,
                                   candidate_factor=args.candidate_factor,
                                   outlier_blocks=args.outlier_blocks,
                                   local_blocks=args.local_blocks)
                start = time.perf_counter()
                res = run_sparse(model, cfg, k_pre, values, rope, fp, dense_tokens, dense_logits)
                step_s = (time.perf_counter() - start) / args.new_tokens
                # teacher-forced top-1 agreement on every answer token <=> identical greedy
                # output, so the sparse answer matches exactly when the dense one does.
                sparse_match = dense_match and res["all_top1"]
                emit("sparse", f"{selector}@{budget}", **common, selector=selector,
                     rank=cfg.rank, exact_keys=args.exact_keys, summaries=args.summaries,
                     candidate_factor=args.candidate_factor,
                     outlier_blocks=args.outlier_blocks, local_blocks=args.local_blocks,
                     budget_tokens=budget, **res, needle_match=sparse_match,
                     needle_match_dense=dense_match, full_kv_bytes=full_kv_bytes,
                     fetched_frac_first=res["fetched_bytes_first"] / full_kv_bytes,
                     fetched_frac_mean=res["fetched_bytes_mean"] / full_kv_bytes,
                     step_s=step_s, dense_step_s=dense_s / args.new_tokens)


if __name__ == "__main__":
    main()
