"""The worker half of the vLLM connector: layer-wise loads and in-step saves (no vLLM import).

One step: ``start_step`` hands each request's load to a loader thread that
writes the stored prefix into its blocks layer by layer. On the daemon's host it
reads the chunks in place (``Client.view``: lease-pinned views of the daemon's
arena) and copies each layer straight into the blocks, hashing it right before
(the checksums complete with the last layer); elsewhere, or for compressed
chunks, it streams them with ``Client.get_layers``. ``wait_for_layer`` blocks
the forward pass only on the layer it is about to use; ``save_layer`` copies
the prompt chunks of requests that complete their prompt this step out of the
blocks; ``end_step`` joins the loads (so failures are reported in this step)
and hands the copied chunks to a saver thread. Nothing here raises into the
engine: failures become block load errors (loads) or a log line and a counter
(saves).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from kvstore.client import Client
from kvstore.errors import Corrupt, InvalidArgument, NotFound, PermissionDenied
from kvstore.integrations._paged import (
    TORCH_DTYPES,
    Slots,
    chunk_slots,
    copy_chunk_layer,
    gather_layer,
    plan_chunk_copy,
    scatter_layer,
    slots_of,
    storage_view,
)
from kvstore.layout import KVLayout

if TYPE_CHECKING:
    from kvstore.client._view import ArenaView

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
    # set once the outcome is final (the blocks written or the failure reported); an
    # in-place load sets it before it releases its lease, which then costs the step nothing
    finished: threading.Event = field(default_factory=threading.Event)


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
        self._paged_np: list[np.ndarray | None] = []  # storage views of CPU blocks
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
        self.num_loads_in_place = 0  # loads read in place from the daemon's arena
        self.num_loads_streamed = 0  # loads streamed with get_layers

    def register(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._paged = [kv_caches[name] for name in self._layer_names]
        dim = self.layout.head_dim
        self._paged_np = [storage_view(t.unflatten(-1, (2, dim))) if t.device.type == "cpu"
                          else None for t in self._paged]

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
        try:
            if self._load_client.may_view() and self._load_in_place(load):
                return
            self._load_streamed(load)
        except Exception as exc:  # dead daemon, corrupt chunk, deadline: recompute
            with load.lock:
                self._fail(load, load.spec.start, repr(exc))
        finally:
            self._finish(load)

    @staticmethod
    def _finish(load: _Load) -> None:
        for event in load.events:
            event.set()
        load.finished.set()

    def _load_in_place(self, load: _Load) -> bool:
        """Load from the daemon's arena; False when the streamed path must do it."""
        spec = load.spec
        try:
            view = self._load_client.view(spec.tokens, verify=False, ttl_s=self.timeout_s)
        except (PermissionDenied, NotFound) as exc:  # not the daemon's host after all
            log.info("kvstore loads stream: the daemon's arena is not usable here (%s)", exc)
            return False
        except (InvalidArgument, Corrupt) as exc:  # compressed chunks, a bad header
            log.info("kvstore load of request %s streams: %s", spec.req_id, exc)
            return False
        with view:
            num_stored = view.lease.num_chunks_stored * self.layout.chunk_tokens
            end = max(spec.start, min(spec.end, num_stored))  # less: evicted since the lookup
            if view.num_tokens < end:
                return False  # some chunks live below DRAM: the daemon's Get reads them
            self.num_loads_in_place += 1
            if self._scatter_in_place(load, view, end) and end < spec.end:
                with load.lock:  # the stored run is loaded; vLLM recomputes from its end
                    self._fail(load, end, f"only {num_stored} tokens stored")
            self._finish(load)  # the step goes on while the lease is released
        return True

    def _scatter_in_place(self, load: _Load, view: ArenaView, end: int) -> bool:
        """Copy tokens ``[start, end)`` from the arena into the blocks, layer after layer;
        False when the load failed (or was cancelled) on the way.

        Layer l's event is set once it is in the blocks; each chunk's checksum is fed
        right before each of its layers is copied and checked after the last one. A
        mismatch fails the load from that chunk's first token within this step, and
        vLLM drops this step's output of a request whose load failed, so bytes read
        before the check can only be recomputed, never kept.
        """
        spec, per_chunk = load.spec, self.layout.chunk_tokens
        is_cpu = bool(self._paged_np) and self._paged_np[0] is not None
        plans = [plan_chunk_copy(c, view.chunks[c], slots, c * per_chunk, is_cpu)
                 for c, slots in chunk_slots(spec.block_ids, self.block_size, spec.start,
                                             end, per_chunk, self._paged[0].device)]
        checksums = [view.checksum(plan.index) for plan in plans]
        staging = torch.empty(self.layout.shape(per_chunk)[1:],  # [2, heads, T, dim]
                              dtype=TORCH_DTYPES[self.layout.dtype])
        for layer, paged in enumerate(self._paged):
            with load.lock:
                if load.first_bad is not None:
                    return False  # cancelled by a timeout: the blocks belong to vLLM again
                for plan, checksum in zip(plans, checksums, strict=True):
                    checksum.update(layer)
                    copy_chunk_layer(plan, layer, view.chunks[plan.index], paged,
                                     self._paged_np[layer], staging)
            load.events[layer].set()
        for plan, checksum in zip(plans, checksums, strict=True):
            try:
                checksum.check()
            except Corrupt as exc:
                with load.lock:
                    self._fail(load, plan.index * per_chunk, str(exc))
                return False
        return True

    def _load_streamed(self, load: _Load) -> None:
        spec, num_layers, slots = load.spec, 0, load.slots
        self.num_loads_streamed += 1
        for layer, kv in self._load_client.get_layers(spec.tokens):
            num_got = kv.shape[2]
            if num_got < spec.end and slots is load.slots:  # evicted since the lookup
                slots = slots_of(spec.block_ids, self.block_size, spec.start,
                                 max(spec.start, num_got), self._paged[layer].device)
            with load.lock:
                if load.first_bad is not None:
                    return  # cancelled by a timeout: the blocks belong to vLLM again
                scatter_layer(self._paged[layer], kv, slots)
            load.events[layer].set()
            num_layers += 1
        with load.lock:
            if num_layers < len(self._paged):
                self._fail(load, spec.start, "nothing stored")
            elif slots is not load.slots:  # the stored run is loaded; vLLM recomputes the rest
                self._fail(load, slots.end, f"only {slots.end} tokens stored")

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
            # The loader catches its own errors: not finishing in time is the only failure.
            if load.future is not None and not load.finished.wait(
                    max(0.0, self._deadline - time.monotonic())):
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
