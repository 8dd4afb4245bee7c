"""vLLM KV connector v1: prefix KV from kvstore into vLLM's paged blocks, and back.

Load it with::

    --kv-transfer-config '{"kv_connector":"KVStoreConnector",
      "kv_connector_module_path":"kvstore.integrations.vllm","kv_role":"kv_both",
      "kv_connector_extra_config":{"address":"127.0.0.1:50051"}}'
    --disable-hybrid-kv-cache-manager

Decisions (docs/design.md, "Engine connectors"):

- Keys are kvstore's own prefix chunk hashes of the prompt's token ids
  (``kvstore.keys.prefix_keys``), never vLLM's block hashes (seeded per
  process unless PYTHONHASHSEED is fixed): every process, restart and engine
  computes the same keys. The tensor-parallel rank is part of the namespace.
- A hit is the stored prefix, capped below the last prompt token and rounded
  down to vLLM's block size; chunk_tokens need not be a multiple of it.
- Loads are synchronous within the step and layer-wise: a loader thread streams
  ``Client.get_layers`` and writes each layer into its blocks while the forward
  pass runs earlier layers. Any failure (dead daemon, corrupt or evicted chunk,
  timeout) becomes block load errors for the request's blocks still to be
  loaded; vLLM then recomputes or fails the request per ``kv_load_failure_policy``.
- Saves copy a request's prompt chunks out of the blocks layer by layer in the
  step that completes its prompt, and a saver thread puts them: blocks are never
  held past the step, so ``request_finished`` never delays freeing them.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from kvstore.client import Client
from kvstore.errors import InvalidArgument
from kvstore.integrations._paged import DTYPE_NAMES, check_paged
from kvstore.integrations._vllm_worker import LoadSpec, SaveSpec, Worker
from kvstore.layout import KVLayout

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger(__name__)

@dataclass
class KVStoreConnectorMetadata(KVConnectorMetadata):
    """What the worker does this step; pickled inside SchedulerOutput (no live handles)."""

    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)


@dataclass(slots=True)
class _Tracked:
    """Scheduler-side state of one request."""

    num_prompt_tokens: int
    # int32 prompt token ids, converted on the lookup thread (not the scheduler's);
    # set before the lookup's future completes, so before anything is planned
    prompt: np.ndarray | None = None
    num_stored: int = 0  # tokens the daemon held at the last lookup
    load: tuple[int, int] | None = None  # tokens [start, end) to load in the next step
    block_ids: list[int] = field(default_factory=list)  # all the request's blocks
    is_save_planned: bool = False


def layout_of(kv_cache_config: KVCacheConfig, chunk_tokens: int) -> tuple[KVLayout, list[str]]:
    """The per-rank KVLayout of vLLM's KV cache and its attention layer names, in order."""
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise InvalidArgument(f"KVStoreConnector needs one KV cache group, got {len(groups)}: "
                              "start vLLM with --disable-hybrid-kv-cache-manager")
    spec = groups[0].kv_cache_spec
    head_v = getattr(spec, "head_size_v", None) or spec.head_size
    if head_v != spec.head_size or spec.dtype not in DTYPE_NAMES:
        raise InvalidArgument(
            f"KVStoreConnector stores K and V of one head size in float16/bfloat16/float32; "
            f"the KV cache has K {spec.head_size}, V {head_v}, dtype {spec.dtype}")
    layout = KVLayout(num_layers=len(groups[0].layer_names), num_kv_heads=spec.num_kv_heads,
                      head_dim=spec.head_size, dtype=DTYPE_NAMES[spec.dtype],
                      chunk_tokens=chunk_tokens)
    return layout, list(groups[0].layer_names)


def namespace_of(vllm_config: VllmConfig, configured: str | None) -> str:
    """The namespace name: the configured one or "<model>@<revision>", with the TP size."""
    if configured is None:
        model = vllm_config.model_config
        if model is None:
            raise InvalidArgument("KVStoreConnector needs kv_connector_extra_config.namespace "
                                  "when vLLM has no model config")
        configured = f"{model.model}@{model.revision or 'main'}"
    return f"{configured}/tp{vllm_config.parallel_config.tensor_parallel_size}"


def tp_rank_of(vllm_config: VllmConfig) -> int:
    """This process's tensor-parallel rank (0 on the scheduler: it looks up rank 0's chunks)."""
    if vllm_config.parallel_config.tensor_parallel_size == 1:
        return 0
    from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

    return get_tensor_model_parallel_rank()


class KVStoreConnector(KVConnectorBase_V1):
    """kvstore as vLLM's external prefix cache (scheduler and worker roles).

    Extra config keys: ``address`` ("HOST:PORT" or a list, failover in order),
    ``namespace`` (default "<model>@<revision>"), ``chunk_tokens`` (256),
    ``timeout_s`` (10.0, each daemon call), ``lookup_wait_ms`` (how long
    ``get_num_new_matched_tokens`` waits before answering None; 0.8, so one call
    holds the scheduler under 1 ms even when the daemon's Lookup takes longer),
    ``token``, ``transport`` ("auto").
    """

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole,
                 kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = self._kv_transfer_config.get_from_extra_config
        if vllm_config.parallel_config.pipeline_parallel_size != 1:
            raise InvalidArgument("KVStoreConnector does not support pipeline parallelism yet")
        self._block_size = kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size
        self.layout, self._layer_names = layout_of(kv_cache_config,
                                                    int(extra("chunk_tokens", 256)))
        self.namespace = namespace_of(vllm_config, extra("namespace", None))
        is_worker = role == KVConnectorRole.WORKER
        self.tp_rank = tp_rank_of(vllm_config) if is_worker else 0
        address = extra("address", "127.0.0.1:50051")
        timeout_s = float(extra("timeout_s", 10.0))

        def make_client() -> Client:
            return Client(address, self.namespace, self.layout, token=extra("token", None),
                          timeout_s=timeout_s, tp_rank=self.tp_rank,
                          transport=extra("transport", "auto"))

        self._worker = Worker(self.layout, self._layer_names, self._block_size, make_client,
                              timeout_s) if is_worker else None
        self._client = None if is_worker else make_client()
        self._lookup_wait_s = float(extra("lookup_wait_ms", 0.8)) / 1000
        self._lookups: dict[str, Future[int]] = {}
        self._lookup_pool = None if is_worker else ThreadPoolExecutor(
            max_workers=2, thread_name_prefix="kvstore-lookup")
        self._requests: dict[str, _Tracked] = {}

    # ------------------------------------------------------------------ worker side

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        missing = [name for name in self._layer_names if name not in kv_caches]
        if missing:
            raise InvalidArgument(f"vLLM registered no KV cache for layers {missing}")
        for name in self._layer_names:
            check_paged(kv_caches[name], self.layout.num_kv_heads, self.layout.head_dim,
                        self._block_size)
        self._worker.register(kv_caches)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVStoreConnectorMetadata)
        self._worker.start_step(meta.loads, meta.saves)

    def wait_for_layer_load(self, layer_name: str) -> None:
        self._worker.wait_for_layer(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any,
                      **kwargs: Any) -> None:
        self._worker.save_layer(layer_name, kv_layer)

    def wait_for_save(self) -> None:
        self._worker.end_step()

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.take_load_errors() if self._worker is not None else set()

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.close()
        if self._lookup_pool is not None:
            self._lookup_pool.shutdown(wait=False, cancel_futures=True)
        if self._client is not None:
            self._client.close()

    # ------------------------------------------------------------------ scheduler side

    def on_new_request(self, request: Request) -> None:
        """Start the lookup as the request arrives, so it is done when it is scheduled."""
        self._start_lookup(request)

    def _start_lookup(self, request: Request) -> tuple[_Tracked, Future[int]]:
        rid = request.request_id
        tracked = self._requests.get(rid)
        if tracked is None:
            token_ids = request.prompt_token_ids or []
            tracked = self._requests[rid] = _Tracked(len(token_ids))
        future = self._lookups.get(rid)
        if future is None:
            future = self._lookups[rid] = self._lookup_pool.submit(
                self._lookup, tracked, request.prompt_token_ids or [])
        return tracked, future

    def get_num_new_matched_tokens(self, request: Request,
                                   num_computed_tokens: int) -> tuple[int | None, bool]:
        rid = request.request_id
        tracked, future = self._start_lookup(request)
        try:
            tracked.num_stored = future.result(timeout=self._lookup_wait_s)
        except FutureTimeout:
            return None, False  # asked again next step; the scheduler is not blocked
        finally:
            if future.done():
                del self._lookups[rid]
        hit = min(tracked.num_stored, tracked.num_prompt_tokens - 1) // self._block_size \
            * self._block_size
        num_new = max(0, hit - num_computed_tokens)
        tracked.load = (num_computed_tokens, hit) if num_new else None
        return num_new, False

    def _lookup(self, tracked: _Tracked, token_ids: list[int]) -> int:
        """On the lookup thread: the tokens stored of the request's prompt."""
        if tracked.prompt is None:
            tracked.prompt = np.asarray(token_ids, dtype=np.int32)
        try:
            return self._client.lookup(tracked.prompt)
        except Exception as exc:  # a dead daemon is a miss, never a scheduler crash
            log.warning("kvstore lookup failed, treating it as a miss: %s", exc)
            return 0

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks,
                                 num_external_tokens: int) -> None:
        tracked = self._requests.get(request.request_id)
        if tracked is None:
            return
        if num_external_tokens == 0:
            tracked.load = None
        elif tracked.load is not None:
            start = tracked.load[0]
            tracked.load = (start, start + num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = KVStoreConnectorMetadata()
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            tracked = self._requests.get(new.req_id)
            if tracked is None:
                continue
            tracked.block_ids = list(new.block_ids[0])
            self._plan(new.req_id, tracked, new.num_computed_tokens + scheduled[new.req_id],
                       meta)
        cached = scheduler_output.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):
            tracked = self._requests.get(rid)
            if tracked is None:
                continue
            new_blocks = cached.new_block_ids[i]
            if rid in cached.resumed_req_ids and new_blocks is not None:
                tracked.block_ids = list(new_blocks[0])  # a resumed request's whole table
            elif new_blocks is not None:
                tracked.block_ids.extend(new_blocks[0])
            self._plan(rid, tracked, cached.num_computed_tokens[i] + scheduled.get(rid, 0),
                       meta)
        for rid in scheduler_output.finished_req_ids:
            self._forget(rid)
        return meta

    def _plan(self, rid: str, tracked: _Tracked, num_computed_after: int,
              meta: KVStoreConnectorMetadata) -> None:
        """Add this step's load and save of one request to ``meta``."""
        chunk = self.layout.chunk_tokens
        if tracked.prompt is None:  # never looked up: nothing to load, nothing known to save
            return
        if tracked.load is not None:
            start, end = tracked.load
            meta.loads.append(LoadSpec(rid, tracked.prompt[:-(-end // chunk) * chunk],
                                       tracked.block_ids, start, end))
            tracked.load = None
        num_full = len(tracked.prompt) // chunk * chunk
        if (not tracked.is_save_planned and num_computed_after >= len(tracked.prompt)
                and num_full > tracked.num_stored):
            meta.saves.append(SaveSpec(rid, tracked.prompt[:num_full],
                                       tracked.block_ids[:-(-num_full // self._block_size)]))
            tracked.is_save_planned = True

    def request_finished(self, request: Request,
                         block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        # Saves copy their chunks out of the blocks within the step: nothing to wait for.
        self._forget(request.request_id)
        return False, None

    def _forget(self, rid: str) -> None:
        self._requests.pop(rid, None)
        future = self._lookups.pop(rid, None)
        if future is not None:
            future.cancel()
