"""The worker half of the vLLM connector: layer-wise loads and in-step saves (no vLLM import).

One step: ``start_step`` starts a loader thread per step that streams each
request's stored prefix with ``Client.get_layers`` and writes every layer into
its blocks as it arrives; ``wait_for_layer`` blocks the forward pass only on the
layer it is about to use; ``save_layer`` copies the prompt chunks of requests
that complete their prompt this step out of the blocks; ``end_step`` joins the
loads (so failures are reported in this step) and hands the copied chunks to a
saver thread. Nothing here raises into the engine: failures become block load
errors (loads) or a log line and a counter (saves).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from kvstore.client import Client
from kvstore.integrations._paged import (
    TORCH_DTYPES,
    Slots,
    gather_layer,
    scatter_layer,
    slots_of,
)
from kvstore.layout import KVLayout

log = logging.getLogger(__name__)

MAX_PENDING_SAVES = 8  # saves queued behind a slow daemon before new ones are dropped


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """Load tokens ``[start, end)`` of a request into its blocks (scheduler -> worker)."""

    req_id: str
    tokens: np.ndarray  # int32 prompt prefix whose chunks hold the tokens (chunk-aligned)
    block_ids: list[int]  # the request's block table
    start: int  # first token to write (the engine's own prefix-cache hit ends here)
    end: int  # one past the last token to write (block-aligned)


@dataclass(frozen=True, slots=True)
class SaveSpec:
    """Store the full prompt chunks of a request, read from its blocks this step."""

    req_id: str
    tokens: np.ndarray  # int32, a multiple of chunk_tokens
    block_ids: list[int]  # blocks holding those tokens


@dataclass(slots=True)
class _Load:
    spec: LoadSpec
    slots: Slots | None  # None when the plan did not fit the blocks (failed at once)
    events: list[threading.Event]  # one per layer: set once the layer is written (or failed)
    lock: threading.Lock = field(default_factory=threading.Lock)  # scatter vs cancel
    first_bad: int | None = None  # first token not loaded; None while all is well
    future: Future[None] | None = None


@dataclass(slots=True)
class _Save:
    spec: SaveSpec
    slots: Slots
    staging: torch.Tensor  # [layers, 2, heads, tokens, dim] on the CPU
    num_layers_copied: int = 0


class Worker:
    """Per-process worker state of the connector (one per vLLM worker / TP rank)."""

    def __init__(self, layout: KVLayout, layer_names: list[str], block_size: int,
                 make_client: Callable[[], Client], timeout_s: float) -> None:
        self.layout = layout
        self.block_size = block_size
        self.timeout_s = timeout_s
        self._layer_index = {name: i for i, name in enumerate(layer_names)}
        self._layer_names = layer_names
        self._paged: list[torch.Tensor] = []
        self._load_client, self._save_client = make_client(), make_client()
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvstore-load")
        self._saver = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvstore-save")
        self._loads: list[_Load] = []
        self._saves: list[_Save] = []
        self._deadline = 0.0
        self._load_errors: set[int] = set()
        self._pending_saves = 0
        self._lock = threading.Lock()  # _pending_saves, counters
        self.num_saves_dropped = 0
        self.num_saves_failed = 0

    def register(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._paged = [kv_caches[name] for name in self._layer_names]

    # ------------------------------------------------------------------ loads

    def start_step(self, loads: list[LoadSpec], saves: list[SaveSpec]) -> None:
        self._deadline = time.monotonic() + self.timeout_s
        device = self._paged[0].device if self._paged else "cpu"
        for spec in loads:
            events = [threading.Event() for _ in self._layer_names]
            try:
                slots = slots_of(spec.block_ids, self.block_size, spec.start, spec.end, device)
            except Exception as exc:  # a plan that does not fit the blocks: never crash a step
                load = _Load(spec, None, events)
                self._fail(load, spec.start, repr(exc))
                for event in events:
                    event.set()
            else:
                load = _Load(spec, slots, events)
                load.future = self._loader.submit(self._run_load, load)
            self._loads.append(load)
        for spec in saves:
            try:
                slots = slots_of(spec.block_ids, self.block_size, 0, len(spec.tokens), device)
            except Exception as exc:
                log.warning("kvstore save of request %s skipped: %s", spec.req_id, exc)
                continue
            staging = torch.empty(self.layout.shape(len(spec.tokens)),
                                  dtype=TORCH_DTYPES[self.layout.dtype])
            self._saves.append(_Save(spec, slots, staging))

    def _run_load(self, load: _Load) -> None:
        spec, num_layers = load.spec, 0
        try:
            # Streamed, or copied out of the daemon's arena on the same host. ZERO-COPY
            # SWITCH POINT: Client.get(out=...) (same host) could read into staging here.
            for layer, kv in self._load_client.get_layers(spec.tokens):
                num_got = kv.shape[2]
                with load.lock:
                    if load.first_bad is not None:
                        return  # cancelled by a timeout: the blocks belong to vLLM again
                    if num_got < spec.end:
                        self._fail(load, num_got, f"only {num_got} tokens stored")
                        return
                    scatter_layer(self._paged[layer], kv, load.slots)
                load.events[layer].set()
                num_layers += 1
            if num_layers < len(self._paged):
                with load.lock:
                    self._fail(load, spec.start, "nothing stored")
        except Exception as exc:  # dead daemon, corrupt chunk, deadline: recompute
            with load.lock:
                self._fail(load, spec.start, repr(exc))
        finally:
            for event in load.events:
                event.set()

    def _fail(self, load: _Load, first_bad: int, why: str) -> None:
        """Report the blocks of tokens ``[first_bad, end)``; caller holds ``load.lock``."""
        spec = load.spec
        if load.first_bad is not None:
            return
        first_bad = max(spec.start, first_bad) // self.block_size * self.block_size
        load.first_bad = first_bad
        bad = spec.block_ids[first_bad // self.block_size: -(-spec.end // self.block_size)]
        log.warning("kvstore load of request %s failed (%s): %d blocks will be recomputed",
                    spec.req_id, why, len(bad))
        with self._lock:
            self._load_errors.update(bad)

    def wait_for_layer(self, layer_name: str) -> None:
        layer = self._layer_index.get(layer_name)
        if layer is None:
            return
        for load in self._loads:
            if not load.events[layer].wait(max(0.0, self._deadline - time.monotonic())):
                with load.lock:
                    self._fail(load, load.spec.start, "timed out")

    # ------------------------------------------------------------------ saves

    def save_layer(self, layer_name: str, paged: torch.Tensor) -> None:
        layer = self._layer_index.get(layer_name)
        if layer is None:
            return
        for save in self._saves:
            gather_layer(paged, save.slots, save.staging[layer])
            save.num_layers_copied += 1

    def end_step(self) -> None:
        """Join this step's loads, then queue its saves; never raises."""
        failed = set()
        for load in self._loads:
            try:
                if load.future is not None:
                    load.future.result(timeout=max(0.0, self._deadline - time.monotonic()))
            except Exception:  # the loader caught its own errors: this is the timeout
                with load.lock:
                    self._fail(load, load.spec.start, "timed out")
            if load.first_bad is not None:
                failed.add(load.spec.req_id)
        for save in self._saves:
            if save.spec.req_id in failed or save.num_layers_copied < len(self._layer_names):
                continue  # blocks hold KV that is not the request's: never store it
            self._queue_save(save)
        self._loads, self._saves = [], []

    def _queue_save(self, save: _Save) -> None:
        with self._lock:
            if self._pending_saves >= MAX_PENDING_SAVES:
                self.num_saves_dropped += 1
                log.warning("kvstore save of request %s dropped: %d saves pending",
                            save.spec.req_id, self._pending_saves)
                return
            self._pending_saves += 1
        self._saver.submit(self._run_save, save)

    def _run_save(self, save: _Save) -> None:
        try:
            # The one put call: on the daemon's host Client.put builds the objects in the
            # arena (ReserveExtents/CommitExtents); elsewhere it streams.
            self._save_client.put(save.spec.tokens, save.staging)
        except Exception as exc:  # a later request recomputes: a lost save is only a miss
            with self._lock:
                self.num_saves_failed += 1
            log.warning("kvstore save of request %s failed: %s", save.spec.req_id, exc)
        finally:
            with self._lock:
                self._pending_saves -= 1

    def take_load_errors(self) -> set[int]:
        """Block ids whose load failed since the last call (reported once, then cleared)."""
        with self._lock:
            errors, self._load_errors = self._load_errors, set()
        return errors

    def flush(self, timeout_s: float) -> bool:
        """Wait until queued saves are done; True if none is left."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if self._pending_saves == 0:
                    return True
            time.sleep(0.005)
        return False

    def close(self) -> None:
        self.flush(self.timeout_s)
        self._loader.shutdown(wait=False, cancel_futures=True)
        self._saver.shutdown(wait=False, cancel_futures=True)
        self._load_client.close()
        self._save_client.close()
