"""Copies between canonical KV and vLLM-style paged blocks, against a per-token reference."""

from __future__ import annotations

import pytest
import torch

from kvstore.errors import InvalidArgument
from kvstore.integrations._paged import check_paged, gather_layer, scatter_layer, slots_of

HEADS, DIM, BLOCK = 3, 8, 16


def _paged(num_blocks: int, strided: bool) -> torch.Tensor:
    if strided:  # tokens outside heads, as GPU backends lay it out
        return torch.zeros(num_blocks, BLOCK, HEADS, 2 * DIM, dtype=torch.float16) \
            .permute(0, 2, 1, 3)
    return torch.zeros(num_blocks, HEADS, BLOCK, 2 * DIM, dtype=torch.float16)


@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("start,end", [(0, 64), (32, 96), (0, 70), (16, 17), (5, 40), (0, 0)])
def test_scatter_writes_exactly_the_tokens_asked_and_gather_reads_them_back(strided, start,
                                                                            end):
    paged = _paged(20, strided)
    table = torch.randperm(20)[: max(1, -(-end // BLOCK))].tolist()
    kv = torch.randn(2, HEADS, end, DIM).half()
    slots = slots_of(table, BLOCK, start, end)
    scatter_layer(paged, kv, slots)
    expected = torch.zeros_like(paged)
    for t in range(start, end):  # the reference: one token at a time
        expected[table[t // BLOCK], :, t % BLOCK, :DIM] = kv[0, :, t]
        expected[table[t // BLOCK], :, t % BLOCK, DIM:] = kv[1, :, t]
    assert torch.equal(paged, expected)  # nothing outside [start, end) was touched
    out = torch.empty(2, HEADS, end - start, DIM, dtype=torch.float16)
    gather_layer(paged, slots, out)
    assert torch.equal(out, kv[:, :, start:end])


def test_a_plan_longer_than_the_block_table_is_refused():
    with pytest.raises(InvalidArgument, match="need 3 blocks of 16, the request has 2"):
        slots_of([4, 5], BLOCK, 0, 40)


def test_a_paged_tensor_of_another_shape_is_refused_with_the_expected_one():
    with pytest.raises(InvalidArgument, match=r"expected \[num_blocks, 3, 16, 16\]"):
        check_paged(torch.zeros(4, 3, 8, 16), HEADS, DIM, BLOCK)


def test_worker_turns_a_plan_that_does_not_fit_into_load_errors_not_a_crash():
    import numpy as np

    from kvstore.client import Client
    from kvstore.integrations._vllm_worker import LoadSpec, SaveSpec, Worker
    from kvstore.layout import KVLayout

    layout = KVLayout(2, HEADS, DIM, chunk_tokens=32)
    worker = Worker(layout, ["l0", "l1"], BLOCK,
                    lambda: Client("127.0.0.1:1", "m", layout, timeout_s=1), 1.0)
    worker.register({"l0": _paged(8, False), "l1": _paged(8, False)})
    tokens = np.arange(64, dtype=np.int32)
    worker.start_step([LoadSpec("r", tokens, [3, 4], 0, 64)], [SaveSpec("s", tokens, [1])])
    for name in ("l0", "l1"):
        worker.wait_for_layer(name)
    worker.end_step()
    assert worker.take_load_errors() == {3, 4}
    assert worker.take_load_errors() == set()  # reported once
    worker.close()
