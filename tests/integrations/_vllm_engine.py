"""A vLLM-shaped driver for the connector: scheduler here, worker in another process.

The scheduler half makes vLLM's real Request / KVCacheBlocks / SchedulerOutput
objects and calls the scheduler-role connector in vLLM's order
(get_num_new_matched_tokens -> update_state_after_alloc -> build_connector_meta ->
request_finished). The worker half runs in a spawned process with real paged KV
tensors on the CPU and calls the worker-role connector in the model runner's order
(bind -> start_load_kv -> per layer wait_for_layer_load / "attention" /
save_kv_layer -> wait_for_save -> get_block_ids_with_load_errors -> clear). The
two talk only through the pickled SchedulerOutput that carries the metadata.
The "attention" writes KV drawn from a generator seeded by the request id for the
tokens it computes, so loaded bytes can only have come from the store.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

NUM_LAYERS, NUM_HEADS, HEAD_DIM, BLOCK_SIZE, NUM_BLOCKS = 4, 2, 16, 16, 128
LAYER_NAMES = [f"model.layers.{i}.self_attn.attn" for i in range(NUM_LAYERS)]


def make_configs(extra: dict[str, Any], policy: str = "recompute") -> tuple[Any, Any]:
    """A real VllmConfig (CPU device, no model) and KVCacheConfig for the connector."""
    from vllm.config import CacheConfig, DeviceConfig, KVTransferConfig, VllmConfig
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec

    transfer = KVTransferConfig(kv_connector="KVStoreConnector",
                                kv_connector_module_path="kvstore.integrations.vllm",
                                kv_role="kv_both", kv_connector_extra_config=extra,
                                kv_load_failure_policy=policy)
    vllm_config = VllmConfig(kv_transfer_config=transfer,
                             cache_config=CacheConfig(block_size=BLOCK_SIZE),
                             device_config=DeviceConfig(device="cpu"))
    spec = FullAttentionSpec(block_size=BLOCK_SIZE, num_kv_heads=NUM_HEADS,
                             head_size=HEAD_DIM, dtype=torch.float16)
    kv_cache_config = KVCacheConfig(num_blocks=NUM_BLOCKS, kv_cache_tensors=[],
                                    kv_cache_groups=[KVCacheGroupSpec(LAYER_NAMES, spec)])
    return vllm_config, kv_cache_config


def make_connector(extra: dict[str, Any], role_name: str, policy: str = "recompute") -> Any:
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    vllm_config, kv_cache_config = make_configs(extra, policy)
    return KVConnectorFactory.create_connector(vllm_config, KVConnectorRole[role_name],
                                               kv_cache_config)


def make_paged(strided: bool) -> dict[str, torch.Tensor]:
    """Per-layer views [blocks, heads, block_size, 2 * head_dim] of one backing buffer.

    ``strided`` puts tokens outside heads in memory, as GPU backends do.
    """
    if strided:
        backing = torch.zeros(NUM_LAYERS, NUM_BLOCKS, BLOCK_SIZE, NUM_HEADS, 2 * HEAD_DIM,
                              dtype=torch.float16)
        return {n: backing[i].permute(0, 2, 1, 3) for i, n in enumerate(LAYER_NAMES)}
    backing = torch.zeros(NUM_LAYERS, NUM_BLOCKS, NUM_HEADS, BLOCK_SIZE, 2 * HEAD_DIM,
                          dtype=torch.float16)
    return {n: backing[i] for i, n in enumerate(LAYER_NAMES)}


def model_kv(req_id: str, layer: int, num_tokens: int) -> torch.Tensor:
    """The KV this fake model computes for a request's first tokens: [2, heads, n, dim]."""
    gen = torch.Generator().manual_seed(zlib.crc32(req_id.encode()) * 64 + layer)
    # Drawn for the longest prompt and cut, so token t's KV does not depend on num_tokens.
    full = torch.randn(2, NUM_HEADS, NUM_BLOCKS * BLOCK_SIZE, HEAD_DIM, generator=gen)
    return full[:, :, :num_tokens].half()


def worker_main(pipe: Any, extra: dict[str, Any], strided: bool) -> None:
    """The worker process: serves "step", "read" and "stop" commands over ``pipe``."""
    from vllm.forward_context import ForwardContext

    from kvstore.integrations._paged import gather_layer, scatter_layer, slots_of

    connector = make_connector(extra, "WORKER")
    paged = make_paged(strided)
    connector.register_kv_caches(paged)
    pipe.send("ready")
    tables: dict[str, list[int]] = {}
    while True:
        command, payload = pipe.recv()
        if command == "stop":
            connector.shutdown()
            pipe.send(None)
            return
        if command == "read":  # canonical [layers, 2, heads, n, dim] of a request's tokens
            req_id, start, end = payload
            out = torch.empty(NUM_LAYERS, 2, NUM_HEADS, end - start, HEAD_DIM,
                              dtype=torch.float16)
            slots = slots_of(tables[req_id], BLOCK_SIZE, start, end)
            for i, name in enumerate(LAYER_NAMES):
                gather_layer(paged[name], slots, out[i])
            pipe.send(out.numpy())
            continue
        so = pickle.loads(payload)
        computed: dict[str, int] = {}
        for new in so.scheduled_new_reqs:
            tables[new.req_id] = list(new.block_ids[0])
            computed[new.req_id] = new.num_computed_tokens
        cached = so.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            if cached.new_block_ids[i] is not None:
                tables[req_id].extend(cached.new_block_ids[i][0])
            computed[req_id] = cached.num_computed_tokens[i]
        connector.bind_connector_metadata(so.kv_connector_metadata)
        connector.start_load_kv(ForwardContext(no_compile_layers={}, attn_metadata={},
                                               slot_mapping={}))
        for layer, name in enumerate(LAYER_NAMES):
            connector.wait_for_layer_load(name)
            for req_id, num in so.num_scheduled_tokens.items():  # "attention"
                start = computed[req_id]
                scatter_layer(paged[name], model_kv(req_id, layer, start + num),
                              slots_of(tables[req_id], BLOCK_SIZE, start, start + num))
            connector.save_kv_layer(name, paged[name], None)
        connector.wait_for_save()
        errors = connector.get_block_ids_with_load_errors()
        connector.clear_connector_metadata()
        pipe.send(sorted(errors))


@dataclass
class Prefill:
    """What happened to one request's prefill."""

    num_external: int  # tokens the connector said it would load
    load_errors: list[int]  # block ids reported as failed in the first step
    block_ids: list[int]
    num_steps: int
    is_failed: bool = False  # ended by kv_load_failure_policy="fail"


@dataclass
class Engine:
    """The scheduler process's side: a scheduler-role connector and a worker process."""

    extra: dict[str, Any]
    strided: bool = False
    policy: str = "recompute"
    hash_seed: str = "0"
    connector: Any = None
    free_blocks: list[int] = field(default_factory=lambda: list(range(1, NUM_BLOCKS)))

    def __enter__(self) -> Engine:
        self.connector = make_connector(self.extra, "SCHEDULER", self.policy)
        ctx = multiprocessing.get_context("spawn")
        self._pipe, child = ctx.Pipe()
        saved = os.environ.get("PYTHONHASHSEED")
        os.environ["PYTHONHASHSEED"] = self.hash_seed  # the worker hashes differently
        try:
            self._proc = ctx.Process(target=worker_main, args=(child, self.extra, self.strided))
            self._proc.start()
        finally:
            if saved is None:
                os.environ.pop("PYTHONHASHSEED")
            else:
                os.environ["PYTHONHASHSEED"] = saved
        # Importing vLLM takes ~15 s of CPU, minutes on a loaded machine.
        if not self._pipe.poll(900) or self._pipe.recv() != "ready":
            raise TimeoutError("the worker process did not start")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._proc.is_alive():
            self._pipe.send(("stop", None))
            if self._pipe.poll(60):
                self._pipe.recv()
        self._proc.join(30)
        if self._proc.is_alive():
            self._proc.kill()
        self.connector.shutdown()

    def step(self, so: Any) -> list[int]:
        so.kv_connector_metadata = self.connector.build_connector_meta(so)
        self._pipe.send(("step", pickle.dumps(so)))  # the only way to the worker
        if not self._pipe.poll(120):
            raise TimeoutError("worker step did not return")
        return self._pipe.recv()

    def read(self, req_id: str, start: int, end: int) -> np.ndarray:
        self._pipe.send(("read", (req_id, start, end)))
        return self._pipe.recv()

    def prefill(self, req_id: str, prompt: list[int]) -> Prefill:
        """Schedule a whole prompt in one step, then follow the failure policy."""
        from vllm.sampling_params import SamplingParams
        from vllm.v1.core.kv_cache_manager import KVCacheBlocks
        from vllm.v1.core.kv_cache_utils import KVCacheBlock
        from vllm.v1.request import Request

        request = Request(req_id, prompt, SamplingParams(max_tokens=1), None)
        self.connector.on_new_request(request)  # Scheduler.add_request
        deadline = time.monotonic() + 30
        while True:
            num_external, is_async = self.connector.get_num_new_matched_tokens(request, 0)
            if num_external is not None or time.monotonic() > deadline:
                break
            time.sleep(0.002)  # vLLM schedules other requests meanwhile
        assert num_external is not None and not is_async
        num_blocks = -(-len(prompt) // BLOCK_SIZE)
        assert num_blocks <= len(self.free_blocks), "the test's block pool is too small"
        block_ids, self.free_blocks = self.free_blocks[:num_blocks], \
            self.free_blocks[num_blocks:]
        self.connector.update_state_after_alloc(
            request, KVCacheBlocks(([KVCacheBlock(b) for b in block_ids],)), num_external)
        request.num_computed_tokens = num_external
        errors = self.step(self._output(request, block_ids, len(prompt) - num_external))
        result = Prefill(num_external, errors, block_ids, 1)
        bad = [i for i, b in enumerate(block_ids) if b in errors]
        if bad and self.policy == "fail":
            result.is_failed = True
        elif bad:  # vLLM rewinds to the first failed block and recomputes in place
            rewind = bad[0] * BLOCK_SIZE
            self.step(self._resumed(request, rewind, len(prompt) - rewind))
            result.num_steps += 1
        self.connector.request_finished(request, block_ids)
        self.free_blocks += block_ids  # reused last: tests read a request's blocks right after
        return result

    def _output(self, request: Any, block_ids: list[int], num_tokens: int) -> Any:
        from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput

        new = NewRequestData.from_request(request, (block_ids,), None)
        return SchedulerOutput(
            scheduled_new_reqs=[new], scheduled_cached_reqs=CachedRequestData.make_empty(),
            num_scheduled_tokens={request.request_id: num_tokens},
            total_num_scheduled_tokens=num_tokens, scheduled_spec_decode_tokens={},
            scheduled_encoder_inputs={}, finished_req_ids=set(), free_encoder_mm_hashes=[])

    def _resumed(self, request: Any, num_computed: int, num_tokens: int) -> Any:
        from vllm.v1.core.sched.output import CachedRequestData, SchedulerOutput

        cached = CachedRequestData(
            req_ids=[request.request_id], resumed_req_ids=set(), new_token_ids=[[]],
            all_token_ids={}, new_block_ids=[None], num_computed_tokens=[num_computed],
            num_output_tokens=[0])
        return SchedulerOutput(
            scheduled_new_reqs=[], scheduled_cached_reqs=cached,
            num_scheduled_tokens={request.request_id: num_tokens},
            total_num_scheduled_tokens=num_tokens, scheduled_spec_decode_tokens={},
            scheduled_encoder_inputs={}, finished_req_ids=set(), free_encoder_mm_hashes=[])


def expected_kv(req_id: str, num_tokens: int) -> np.ndarray:
    """What the fake model computes for a request's first tokens, [layers, 2, heads, n, dim]."""
    return torch.stack([model_kv(req_id, layer, num_tokens)
                        for layer in range(NUM_LAYERS)]).numpy()
