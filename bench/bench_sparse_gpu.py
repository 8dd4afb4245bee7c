"""Sparse vs dense decode-step latency and max-batch throughput on SmolLM2's shape, on a GPU.

One decode step's attention side over all 30 layers, batched over B sequences at
a context of N tokens (32K-128K), SmolLM2-135M's shape (9 query heads, 3 KV heads,
head dim 64), fp16:

- ``dense``: every layer attends the whole KV cache held in HBM
  (``scaled_dot_product_attention`` with GQA, as an engine's decode kernel would).
- ``sparse``: the first two layers dense; each other layer does what
  ``kvstore.sparse.SparseLayer`` does, batched: landmark scores (GQA max) -> top
  ``8k`` candidate blocks -> rescoring with rank-48 low-rank keys -> top ``k``
  (budget 512 tokens: k = 54 blocks of 8) -> gather of the missed blocks' exact
  keys and values from pinned host memory (the DRAM arena's role, read by the GPU
  through unified addressing) -> attention over the resident exact tokens (sink,
  outliers, window, selected) plus one summary term per unselected block. HBM
  holds the shadows (landmarks, value means, low-rank factors) and the resident
  tokens only. ``--miss-rate`` is the share of selected blocks fetched per step
  (default 0.28: bench_sparse.py measured a 0.72 hit rate at budget 512).

For each N: the largest batch each mode fits in free HBM (``max_batch``), the step
time and tokens/s there, and both modes at equal batches (1 and dense's largest).
Not included: the model's projections and MLP (SmolLM2's 270 MB of weights, read
once per step whatever the mode), and RoPE on gathered keys. The host pool is one
N-token sequence's keys and values shared by the batch (host RAM could not hold
one per sequence at 128K); every sequence selects its own blocks from it.

    python bench/bench_sparse_gpu.py                        # 32K,64K,128K on CUDA
    python bench/bench_sparse_gpu.py --contexts 131072 --repeat 3
    python bench/bench_sparse_gpu.py --smoke                # tiny, CPU too
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit  # noqa: E402

SUBJECT = "sparse_gpu"


@dataclass(frozen=True, slots=True)
class Shape:
    layers: int = 30
    q_heads: int = 9
    kv_heads: int = 3
    dim: int = 64
    dense_layers: int = 2
    block: int = 8
    budget: int = 512
    reserved_blocks: int = 10  # sink 1 + outliers 4 + window 4 + tail 1 (SparseConfig)
    candidate_factor: int = 8
    rank: int = 48  # a quarter of kv_heads * dim

    @property
    def k(self) -> int:
        return (self.budget - self.reserved_blocks * self.block) // self.block

    def dense_bytes(self, n: int) -> int:
        """HBM of one sequence's dense KV cache."""
        return self.layers * 2 * self.kv_heads * n * self.dim * 2

    def sparse_bytes(self, n: int) -> int:
        """HBM of one sequence's sparse state: dense layers + shadows + resident tokens."""
        nb = n // self.block
        per_layer = (2 * self.kv_heads * nb * self.dim * 2  # landmarks, value means
                     + n * self.rank * 2  # low-rank factors of the pre-RoPE keys
                     + self.rank * self.kv_heads * self.dim * 2  # basis
                     + 2 * self.kv_heads * self.budget * self.dim * 2)  # resident exact
        sparse_layers = self.layers - self.dense_layers
        return self.dense_layers * self.dense_bytes(n) // self.layers + sparse_layers * per_layer


def _uva_view(host: torch.Tensor) -> torch.Tensor:
    """A CUDA tensor reading pinned ``host`` memory in place (unified addressing)."""

    class _Cai:
        __cuda_array_interface__ = {"shape": tuple(host.shape), "typestr": "<f2",
                                    "data": (host.data_ptr(), False), "version": 3,
                                    "strides": None}

    return torch.as_tensor(_Cai(), device="cuda")


class DenseState:
    def __init__(self, s: Shape, batch: int, n: int, device: str) -> None:
        self.s = s
        self.k = [torch.empty(batch, s.kv_heads, n, s.dim, dtype=torch.float16, device=device)
                  .normal_() for _ in range(s.layers)]
        self.v = [torch.empty_like(t).normal_() for t in self.k]

    def step(self, q: torch.Tensor) -> torch.Tensor:  # q [B, Hq, 1, D]
        out = q
        for k, v in zip(self.k, self.v, strict=True):
            out = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return out


class SparseState:
    def __init__(self, s: Shape, batch: int, n: int, device: str, pool: list[torch.Tensor],
                 miss_rate: float) -> None:
        self.s, self.n, self.batch = s, n, batch
        nb = n // s.block
        f16 = {"dtype": torch.float16, "device": device}
        self.dense = DenseState(Shape(layers=s.dense_layers), batch, n, device)
        sparse = s.layers - s.dense_layers
        self.landmarks = [torch.randn(batch, s.kv_heads, nb, s.dim, **f16) for _ in range(sparse)]
        self.means = [torch.randn(batch, s.kv_heads, nb, s.dim, **f16) for _ in range(sparse)]
        self.coeffs = [torch.randn(batch, n, s.rank, **f16) for _ in range(sparse)]
        self.basis = [torch.randn(batch, s.kv_heads, s.rank, s.dim, **f16) for _ in range(sparse)]
        self.res_k = [torch.randn(batch, s.kv_heads, s.budget, s.dim, **f16)
                      for _ in range(sparse)]
        self.res_v = [torch.randn_like(t) for t in self.res_k]
        self.pool = pool  # per sparse layer: [2, Hkv, nb, block * D] keys, values (host)
        self.num_missed = max(1, round(s.k * miss_rate))
        self.heads = torch.arange(s.kv_heads, device=device)[None, :, None]
        self.offsets = torch.arange(s.block, device=device)
        self.summary_bias = math.log(s.block)

    def _layer(self, i: int, q: torch.Tensor) -> torch.Tensor:
        s, b = self.s, self.batch
        qg = q.view(b, s.kv_heads, -1, s.dim)  # [B, Hkv, G, D]
        lm = self.landmarks[i]
        scores = torch.einsum("bhgd,bhnd->bhgn", qg, lm).amax(2)  # [B, Hkv, nb]
        cand = scores.topk(s.k * s.candidate_factor, dim=-1).indices  # [B, Hkv, C]
        tokens = (cand[..., None] * s.block + self.offsets).flatten(2)  # [B, Hkv, C*T]
        coeffs = self.coeffs[i][torch.arange(b, device=q.device)[:, None, None], tokens]
        keys = coeffs @ self.basis[i]  # [B, Hkv, C*T, D]
        rescored = torch.einsum("bhgd,bhnd->bhgn", qg, keys).amax(2)
        per_block = rescored.view(b, s.kv_heads, -1, s.block).amax(-1)
        chosen = cand.gather(2, per_block.topk(s.k, dim=-1).indices)  # [B, Hkv, k]
        missed = chosen[..., : self.num_missed]
        fetched_k = self.pool[i][0][self.heads, missed]  # [B, Hkv, m, T*D], over PCIe
        fetched_v = self.pool[i][1][self.heads, missed]
        m = self.num_missed * s.block
        self.res_k[i][:, :, :m].copy_(fetched_k.view(b, s.kv_heads, m, s.dim))
        self.res_v[i][:, :, :m].copy_(fetched_v.view(b, s.kv_heads, m, s.dim))
        all_k = torch.cat((self.res_k[i], lm), dim=2)  # exact tokens, then one term per block
        all_v = torch.cat((self.res_v[i], self.means[i]), dim=2)
        bias = torch.zeros(all_k.shape[2], dtype=torch.float16, device=q.device)
        bias[s.budget :] = self.summary_bias  # a summary stands for block_tokens tokens
        return F.scaled_dot_product_attention(q, all_k, all_v, attn_mask=bias[None],
                                              enable_gqa=True)

    def step(self, q: torch.Tensor) -> torch.Tensor:
        out = self.dense.step(q)
        for i in range(self.s.layers - self.s.dense_layers):
            out = self._layer(i, q)
        return out


def host_pool(s: Shape, n: int, device: str) -> tuple[list[torch.Tensor], str]:
    """One sequence's exact keys and values per sparse layer, pinned, seen by the GPU.

    Returns the pool and where it lives: "host (UVA)", or "hbm" where torch refused
    a device view of pinned memory (the figures then omit the PCIe reads).
    """
    nb = n // s.block
    pool, where = [], "host (UVA)" if device == "cuda" else "host"
    for _ in range(s.layers - s.dense_layers):
        host = torch.empty(2, s.kv_heads, nb, s.block * s.dim, dtype=torch.float16,
                           pin_memory=device == "cuda")
        # Contents do not change the timing; zeroing 2.8 GB beats a CPU normal_ by seconds.
        if device != "cuda":
            pool.append(host.normal_())
            continue
        host.zero_()
        try:
            view = _uva_view(host)
            view._host = host  # type: ignore[attr-defined] # keep the pages alive
        except (RuntimeError, TypeError) as exc:
            where = f"hbm (no UVA view: {exc})"
            view = host.to(device)
        pool.append(view)
    return pool, where


def time_step(state: Any, batch: int, s: Shape, repeat: int, device: str) -> float:
    q = torch.randn(batch, s.q_heads, 1, s.dim, dtype=torch.float16, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    state.step(q)
    sync()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        state.step(q)
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def max_batch(per_seq: int, device: str, headroom: float, cap: int) -> int:
    if device != "cuda":
        return 2
    free, _ = torch.cuda.mem_get_info()
    return max(1, min(cap, int(free * headroom) // per_seq))


def run_context(s: Shape, n: int, args: argparse.Namespace, device: str,
                common: dict[str, Any]) -> None:
    pool, where = host_pool(s, n, device)
    b_dense = max_batch(s.dense_bytes(n), device, args.headroom, args.max_batch)
    b_sparse = max_batch(s.sparse_bytes(n), device, args.headroom, args.max_batch)
    runs = [("dense", 1), ("sparse", 1), ("dense", b_dense), ("sparse", b_dense),
            ("sparse", b_sparse)]
    seen: set[tuple[str, int]] = set()
    for mode, batch in runs:
        if (mode, batch) in seen:
            continue
        seen.add((mode, batch))
        state = (DenseState(s, batch, n, device) if mode == "dense" else
                 SparseState(s, batch, n, device, pool, args.miss_rate))
        seconds = time_step(state, batch, s, args.repeat, device)
        del state
        if device == "cuda":
            torch.cuda.empty_cache()
        largest = batch == (b_dense if mode == "dense" else b_sparse)
        emit(SUBJECT, mode, **common, context=n, batch=batch, is_max_batch=largest,
             step_ms=round(seconds * 1e3, 3), tokens_per_s=round(batch / seconds, 1),
             hbm_per_seq_mb=round((s.dense_bytes(n) if mode == "dense" else
                                   s.sparse_bytes(n)) / 1e6, 1),
             miss_rate=args.miss_rate if mode == "sparse" else None, budget=s.budget,
             value_pool=where if mode == "sparse" else None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", default="32768,65536,131072", help="context lengths, tokens")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--miss-rate", type=float, default=0.28,
                   help="share of selected blocks fetched from host memory per step")
    p.add_argument("--headroom", type=float, default=0.80,
                   help="share of free HBM a batch may take (the rest: temporaries)")
    p.add_argument("--max-batch", type=int, default=512, help="largest batch tried")
    p.add_argument("--smoke", action="store_true", help="tiny contexts, batch 2 (CPU too)")
    args = p.parse_args(argv)
    s = Shape()
    if args.smoke:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        s = Shape(layers=4, budget=128, reserved_blocks=10)
        args.contexts, args.repeat, args.max_batch = "1024", 1, 2
    elif not torch.cuda.is_available():
        emit(SUBJECT, "skipped", skipped=True, reason="no CUDA device; --smoke runs tiny "
             "shapes on the CPU")
        return 0
    else:
        device = "cuda"
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    common = {"device": name, "smoke": args.smoke}
    with torch.no_grad():
        for n in (int(c) for c in args.contexts.split(",")):
            run_context(s, n, args, device, common)
    return 0


if __name__ == "__main__":
    sys.exit(main())
