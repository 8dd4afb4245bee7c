"""How much of a RAG prompt the blend recomputes: a TTFT budget and an adaptive count.

A blend costs, relative to a full prefill of the same ``N`` tokens on ``L`` layers:

    share(rows) = fixed_share + row_cost * (rows / N) * (L - 1) / L

``rows`` are the tokens run through layers 1..L-1: the recomputed passage tokens,
the prefix tokens with no stored KV and the query. ``fixed_share`` is what a blend
pays with nothing recomputed (layer 0 for every token, loading and rotating the
stored KV, the layer-1 projections that rank the candidates); ``row_cost`` is what a
row costs on the decoder layers relative to one token of the full prefill (fewer
rows per matmul, an explicit mask). The predicted speedup is ``1 / share``.
The shares depend on how many threads the matmuls get: a full prefill's large
matmuls gain more from a second thread than the blend's few rows, so the blend
saves more on one thread. :func:`cost_model` picks the fit for the current torch
thread count; both were fitted on SmolLM2-135M on CPU, 4 x 256-token passages, bench
prompts only, each as a line that predicts no more than was measured at any point:

- 2 threads or more (``bench/bench_rag.py --prompts 6 --threads 2``, wall time,
  quiet VM, fixed ratios 5/15/20/25/30%: measured 5.19x / 3.23x / 2.69x / 2.57x /
  2.27x): the line through the 5% and 20% points (predicts 5.14x / 3.19x / 2.68x /
  2.32x / 2.04x).
- 1 thread (CPU time of blend and full prefill timed back to back, 2 bench prompts x
  3 repeats, medians, 5/15/25/35%: measured 6.18x / 3.27x / 2.65x / 2.14x, loaded VM):
  the line through the 15% and 35% points (predicts 4.45x / 3.27x / 2.59x / 2.14x).

A GPU or another model has other shares.

The adaptive count (``build_cache(recompute_ratio=None)``, the default) recomputes
the passage tokens whose layer-1 deviation (see :mod:`kvstore.rag.blend`) exceeds
:data:`DEVIATION_THRESHOLD`, at least :data:`MIN_RATIO` of them and at most what the
caller's ``min_speedup`` allows. A passage computed after the prompt's own prefix
and placed first deviates almost nowhere; passages that follow other passages
deviate where they would have attended to them, so more passages and more
interaction raise the count, up to the budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvstore.errors import InvalidArgument

DEVIATION_THRESHOLD = 0.005  # layer-1 K+V deviation (units of mean square) worth a recompute
MIN_RATIO = 0.05  # of passage tokens, recomputed even when few deviate
DEFAULT_MIN_SPEEDUP = 3.0  # build_cache's default TTFT budget, vs a full prefill


@dataclass(frozen=True, slots=True)
class CostModel:
    """A blend's cost as a share of a full prefill (see the module docstring)."""

    fixed_share: float = 0.095  # share paid with no row on layers 1..L-1
    row_cost: float = 1.27  # one row on layers 1..L-1, per token of the full prefill

    def predicted_speedup(self, num_tokens: int, num_rows: int, num_layers: int) -> float:
        """Full prefill time / blend time for ``num_rows`` of ``num_tokens`` on layers 1..L-1."""
        share = (
            self.fixed_share + self.row_cost * num_rows / num_tokens * (num_layers - 1) / num_layers
        )
        return 1.0 / share

    def max_rows(self, num_tokens: int, num_layers: int, min_speedup: float) -> int:
        """The most rows on layers 1..L-1 whose predicted speedup is still >= ``min_speedup``."""
        left = 1.0 / min_speedup - self.fixed_share
        if left <= 0:
            return 0
        rows = math.floor(left / self.row_cost * num_tokens * num_layers / (num_layers - 1))
        return min(rows, num_tokens)


COST = CostModel()  # 2 threads or more
COST_ONE_THREAD = CostModel(fixed_share=0.155, row_cost=0.864)


def cost_model(num_threads: int | None = None) -> CostModel:
    """The fitted :class:`CostModel` for ``num_threads`` torch threads (default: the current)."""
    threads = torch.get_num_threads() if num_threads is None else num_threads
    return COST_ONE_THREAD if threads <= 1 else COST


@dataclass(frozen=True, slots=True)
class Recompute:
    """How many of the candidate (passage) tokens the blend recomputes on layers 1..L-1."""

    max_rows: int  # never more: a fixed ratio's count, or what the TTFT budget leaves
    threshold: float | None = None  # None: exactly max_rows; else those deviating more
    min_rows: int = 0  # with a threshold: at least this many (capped by max_rows)

    def count(self, num_deviating: int) -> int:
        """Rows to recompute when ``num_deviating`` candidates exceed the threshold."""
        if self.threshold is None:
            return self.max_rows
        return min(self.max_rows, max(self.min_rows, num_deviating))


def plan_recompute(
    num_tokens: int,
    num_candidates: int,
    num_fixed_rows: int,
    num_layers: int,
    ratio: float | None,
    min_speedup: float,
) -> Recompute:
    """The blend's :class:`Recompute` for one prompt.

    Args:
        num_tokens: prompt tokens (prefix + passages + query).
        num_candidates: passage tokens (those that may be recomputed).
        num_fixed_rows: rows on layers 1..L-1 whatever is chosen (query, unstored prefix).
        num_layers: decoder layers of the model.
        ratio: a fixed share of the candidates (``min_speedup`` then does not apply), or
            None for the adaptive count within ``min_speedup``.
        min_speedup: the least predicted speedup over a full prefill the caller accepts.
    """
    if ratio is not None:
        return Recompute(max_rows=round(ratio * num_candidates))
    if not min_speedup >= 1.0:
        raise InvalidArgument(f"min_speedup must be >= 1 (a full prefill), got {min_speedup}")
    allowed = cost_model().max_rows(num_tokens, num_layers, min_speedup) - num_fixed_rows
    max_rows = max(0, min(num_candidates, allowed))
    return Recompute(
        max_rows=max_rows,
        threshold=DEVIATION_THRESHOLD,
        min_rows=round(MIN_RATIO * num_candidates),
    )
