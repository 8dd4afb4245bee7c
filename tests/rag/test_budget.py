"""The blend's TTFT budget: cost model, the rows it allows, the adaptive count."""

from __future__ import annotations

import pytest

from kvstore.errors import InvalidArgument
import torch

from kvstore.rag.budget import COST, COST_ONE_THREAD, MIN_RATIO, cost_model, plan_recompute


@pytest.mark.parametrize("min_speedup", [1.5, 2.0, 3.0, 4.0, 6.0])
@pytest.mark.parametrize("num_tokens", [300, 1059, 8000])
def test_max_rows_is_the_most_rows_within_the_predicted_speedup(num_tokens, min_speedup):
    rows = COST.max_rows(num_tokens, 30, min_speedup)
    assert COST.predicted_speedup(num_tokens, rows, 30) >= min_speedup
    assert COST.predicted_speedup(num_tokens, rows + 1, 30) < min_speedup


def test_max_rows_is_zero_when_even_no_recompute_misses_the_budget():
    assert COST.max_rows(1000, 30, 1 / COST.fixed_share + 0.1) == 0


def test_plan_recompute_keeps_query_and_prefix_rows_inside_the_budget():
    plan = plan_recompute(1059, 1024, 35, 30, None, 3.0)
    cost = cost_model()  # the fit for this process's thread count (other tests may set it)
    assert cost.predicted_speedup(1059, plan.max_rows + 35, 30) >= 3.0
    assert cost.predicted_speedup(1059, plan.max_rows + 36, 30) < 3.0
    tighter = plan_recompute(1059, 1024, 35, 30, None, 4.0)
    assert 0 < tighter.max_rows < plan.max_rows


def test_adaptive_count_follows_deviation_between_floor_and_budget():
    plan = plan_recompute(1059, 1024, 35, 30, None, 3.0)
    assert plan.min_rows == round(MIN_RATIO * 1024)
    assert plan.count(0) == plan.min_rows
    assert plan.count(plan.min_rows + 10) == plan.min_rows + 10
    assert plan.count(1024) == plan.max_rows


def test_fixed_ratio_ignores_the_budget():
    plan = plan_recompute(1059, 1024, 35, 30, 0.5, 3.0)
    assert plan.threshold is None and plan.count(0) == plan.count(1024) == 512


def test_min_speedup_below_one_is_refused():
    with pytest.raises(InvalidArgument, match="min_speedup"):
        plan_recompute(100, 80, 5, 30, None, 0.5)


def test_cost_model_follows_the_thread_count():
    assert cost_model(1) is COST_ONE_THREAD
    assert cost_model(2) is cost_model(16) is COST
    assert cost_model() is cost_model(torch.get_num_threads())
    # One thread: the full prefill gains less from threads than the blend loses, so
    # a 3x budget allows more recompute (4 x 256 passages: 16.5% -> 18.6%).
    assert COST_ONE_THREAD.max_rows(1059, 30, 3.0) > COST.max_rows(1059, 30, 3.0)


@pytest.mark.parametrize("threads", [1, 2])
def test_plan_recompute_uses_the_current_thread_counts_cost_model(threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        plan = plan_recompute(1059, 1024, 35, 30, None, 3.0)
    finally:
        torch.set_num_threads(before)
    assert plan.max_rows == cost_model(threads).max_rows(1059, 30, 3.0) - 35
