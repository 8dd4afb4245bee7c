"""The GPU HBM tier: decoded chunks as CUDA tensors, LRU within a byte capacity.

Holds *decoded* chunks (``[layers, 2, kv_heads, tokens, head_dim]`` tensors of the
layout's dtype) ready to be copied into an inference engine's KV cache. Same-host
clients receive a CUDA IPC handle (``export``) and copy device to device from the
daemon's memory; ``import_ipc`` is their side.

CUDA only: torch is imported lazily, inside the constructor, so importing this
module (or the tiers package) never loads torch on a CPU-only machine. Copies
run on the tier's own CUDA stream and callers get an event to wait on, so the
daemon's event loop never blocks on a GPU copy (the servicer awaits the event
from its I/O pool).

Not wired into the engine's placement yet (see docs/design.md §5): it is a
building block tested on a GPU machine (tests/tiers/test_gpu.py, marker ``gpu``).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from kvstore.errors import InvalidArgument, Unavailable
from kvstore.keys import ChunkKey
from kvstore.tiers.base import TierStats

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class GpuTierConfig:
    """Configuration of the GPU tier (not yet part of the TOML tree)."""

    capacity_bytes: int  # HBM the tier may hold; LRU evicts beyond it
    device: int = 0  # CUDA device index


@dataclass(frozen=True, slots=True)
class IpcChunk:
    """A chunk exported to another process on the same host (pickle-free fields)."""

    handle: tuple[Any, ...]  # torch's CUDA IPC reduction args (storage handle, offsets)
    shape: tuple[int, ...]  # [layers, 2, kv_heads, tokens, head_dim]
    dtype: str  # "float16", "bfloat16" or "float32"
    device: int  # CUDA device index holding it


def cuda_available() -> bool:
    """True when torch is installed and sees a CUDA device (imports torch lazily)."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


class GpuTier:
    """GPU tier, name ``"gpu"``: an OrderedDict LRU of CUDA tensors under one lock."""

    name = "gpu"

    def __init__(self, config: GpuTierConfig) -> None:
        """Raises:
        Unavailable: torch or CUDA is missing.
        """
        if not cuda_available():
            raise Unavailable("the GPU tier needs torch with a CUDA device; none was found")
        import torch

        self._torch = torch
        self._device = torch.device("cuda", config.device)
        self._stream = torch.cuda.Stream(device=self._device)
        self._capacity_bytes = config.capacity_bytes
        self._lock = threading.Lock()
        self._entries: OrderedDict[ChunkKey, Any] = OrderedDict()  # LRU first
        self._used_bytes = 0
        self._stats = TierStats(name=self.name, capacity_bytes=config.capacity_bytes)

    def put(self, key: ChunkKey, chunk: Any) -> Any:
        """Copy ``chunk`` (a torch tensor on any device) into HBM without blocking.

        Returns:
            A ``torch.cuda.Event`` recorded after the copy (wait on it off the event
            loop), or None if the chunk is larger than the capacity.
        """
        size = chunk.numel() * chunk.element_size()
        if size > self._capacity_bytes:
            return None
        with self._torch.cuda.stream(self._stream):
            held = self._torch.empty(chunk.shape, dtype=chunk.dtype, device=self._device)
            held.copy_(chunk, non_blocking=True)
            done = self._torch.cuda.Event()
            done.record(self._stream)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._used_bytes -= old.numel() * old.element_size()
            self._entries[key] = held
            self._used_bytes += size
            self._stats.puts += 1
            self._stats.written_bytes += size
            while self._used_bytes > self._capacity_bytes:
                _, victim = self._entries.popitem(last=False)
                self._used_bytes -= victim.numel() * victim.element_size()
                self._stats.evictions += 1
        return done

    def get(self, key: ChunkKey) -> Any:
        """The held tensor (shared, do not modify), or None."""
        with self._lock:
            tensor = self._entries.get(key)
            if tensor is None:
                self._stats.misses += 1
                return None
            self._entries.move_to_end(key)
            self._stats.hits += 1
            self._stats.read_bytes += tensor.numel() * tensor.element_size()
            return tensor

    def export(self, key: ChunkKey) -> IpcChunk | None:
        """A CUDA IPC handle of the chunk for a same-host process, or None if absent.

        The receiver must finish its copy before the chunk is evicted; callers pair
        this with a lease (not yet implemented for HBM: see docs/design.md §5).
        """
        from torch.multiprocessing.reductions import reduce_tensor

        tensor = self.get(key)
        if tensor is None:
            return None
        self._stream.synchronize()  # the producing copy must be complete before sharing
        _rebuild, args = reduce_tensor(tensor)
        dtype = str(tensor.dtype).removeprefix("torch.")
        return IpcChunk(tuple(args), tuple(tensor.shape), dtype, self._device.index or 0)

    def contains_many(self, keys: list[ChunkKey]) -> list[bool]:
        with self._lock:
            return [k in self._entries for k in keys]

    def delete(self, key: ChunkKey) -> bool:
        with self._lock:
            tensor = self._entries.pop(key, None)
            if tensor is None:
                return False
            self._used_bytes -= tensor.numel() * tensor.element_size()
            return True

    def stats(self) -> TierStats:
        with self._lock:
            return dataclasses.replace(self._stats, used_bytes=self._used_bytes,
                                       num_objects=len(self._entries),
                                       info={"device": str(self._device)})

    def close(self) -> None:
        with self._lock:
            self._entries.clear()
            self._used_bytes = 0
        self._torch.cuda.empty_cache()


def import_ipc(chunk: IpcChunk, out: Any | None = None) -> Any:
    """Client side: open an exported chunk and copy it device to device.

    Args:
        chunk: what ``GpuTier.export`` returned in the daemon.
        out: a CUDA tensor of the chunk's shape and dtype to copy into; None = new.

    Returns:
        ``out`` (or a new tensor) holding a private copy; the copy is enqueued on the
        current stream, so the caller's later kernels see it in order.
    """
    import torch
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    shared = rebuild_cuda_tensor(*chunk.handle)
    if tuple(shared.shape) != chunk.shape:
        raise InvalidArgument(f"IPC chunk has shape {tuple(shared.shape)}, expected {chunk.shape}")
    if out is None:
        out = torch.empty_like(shared)
    out.copy_(shared, non_blocking=True)
    return out
