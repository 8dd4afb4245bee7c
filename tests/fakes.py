"""Test doubles: a fault-injecting tier wrapper and makers of small real KVC1 objects."""

from __future__ import annotations

import dataclasses
import hashlib
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kvstore.codec.raw import NUMPY_STORAGE, encode_raw
from kvstore.keys import ChunkKey
from kvstore.layout import KVLayout
from kvstore.tiers.base import Tier, TierStats

# 2 layers x 2 x 1 head x 16 tokens x 8 dims x fp16 = 1 KiB of KV, 1088-byte objects.
TINY_LAYOUT = KVLayout(num_layers=2, num_kv_heads=1, head_dim=8, chunk_tokens=16)


def make_object(layout: KVLayout = TINY_LAYOUT, seed: int = 0) -> bytes:
    """A valid raw KVC1 object of one chunk of random KV, determined by ``seed``."""
    rng = np.random.default_rng(seed)
    kv = rng.standard_normal(layout.chunk_shape).astype(NUMPY_STORAGE[layout.dtype])
    return encode_raw(kv, layout)


def make_key(i: int) -> ChunkKey:
    """A distinct, stable ChunkKey per integer."""
    return ChunkKey(hashlib.sha256(f"test-chunk-{i}".encode()).digest())


def flip_bit(data: bytes, offset: int, bit: int = 0) -> bytes:
    """``data`` with one bit flipped at ``offset`` (negative counts from the end)."""
    buf = bytearray(data)
    buf[offset] ^= 1 << bit
    return bytes(buf)


@dataclass(slots=True)
class Faults:
    """Which faults a FaultyTier injects right now; flip fields on and off in a test."""

    fail_gets: bool = False  # get: the backend "raised" (an I/O error turned into a miss)
    corrupt_gets: bool = False  # get: return the stored bytes with a bit flipped
    corrupt_puts: bool = False  # put: store the bytes with a bit flipped (bit rot on write)
    refuse_puts: bool = False  # put: the backend refuses (full, down) -> False
    fail_contains: bool = False  # contains_many: backend unreachable -> all False
    delay_s: float = 0.0  # every call sleeps this long first (a slow device)
    # Deterministic interleavings: a get waits on hold_gets after reading from the
    # inner tier, a put waits on hold_puts before writing; `held` is set on arrival.
    hold_gets: threading.Event | None = None
    hold_puts: threading.Event | None = None
    held: threading.Event = dataclasses.field(default_factory=threading.Event)


class FaultyTier:
    """Wraps a real Tier and injects faults on demand, the way a failing backend would.

    Failures follow the Tier protocol: an injected error is a miss (or a False put)
    counted in ``stats().errors``, never an exception.
    """

    def __init__(self, inner: Tier, name: str | None = None) -> None:
        self.inner = inner
        self.name = name or inner.name
        self.faults = Faults()
        self.num_injected = 0  # faults injected so far
        self.num_errors = 0  # injected faults that a real backend would count as errors
        self.num_puts = 0  # puts that reached this wrapper
        self._lock = threading.Lock()

    def _inject(self, *, is_error: bool = True) -> None:
        with self._lock:
            self.num_injected += 1
            self.num_errors += is_error

    def _maybe_sleep(self) -> None:
        if self.faults.delay_s:
            time.sleep(self.faults.delay_s)

    def _hold(self, gate: threading.Event | None) -> None:
        if gate is not None:
            self.faults.held.set()
            if not gate.wait(timeout=10):
                raise AssertionError("a held call was never released by the test")

    def get(self, key: ChunkKey) -> bytes | None:
        self._maybe_sleep()
        if self.faults.fail_gets:
            self._inject()
            return None
        obj = self.inner.get(key)
        self._hold(self.faults.hold_gets)
        if obj is not None and self.faults.corrupt_gets:
            self._inject(is_error=False)
            return flip_bit(obj, len(obj) // 2)
        return obj

    def put(self, key: ChunkKey, obj: bytes) -> bool:
        self._maybe_sleep()
        with self._lock:
            self.num_puts += 1
        self._hold(self.faults.hold_puts)
        if self.faults.refuse_puts:
            self._inject()
            return False
        if self.faults.corrupt_puts:
            self._inject(is_error=False)
            obj = flip_bit(obj, len(obj) // 2)
        return self.inner.put(key, obj)

    def contains_many(self, keys: Sequence[ChunkKey]) -> list[bool]:
        self._maybe_sleep()
        if self.faults.fail_contains:
            self._inject()
            return [False] * len(keys)
        return self.inner.contains_many(keys)

    def delete(self, key: ChunkKey) -> bool:
        self._maybe_sleep()
        return self.inner.delete(key)

    def stats(self) -> TierStats:
        stats = self.inner.stats()
        return dataclasses.replace(stats, name=self.name, errors=stats.errors + self.num_errors)

    def close(self) -> None:
        self.inner.close()


class HostSlab:
    """A `kvstore.tiers.gpu.DeviceSlab` in a host file: the GPU tier's logic without CUDA.

    A fake of our own storage class (production: ``kvstore.tiers.gpu_cuda.CudaSlab``).
    The "IPC handle" is the file's path, which ``open_host_slab`` maps in any process
    of this host, so the lease RPC, the client's copies and its checksum
    verification run end to end on a CPU. The checksum is the production function
    run by torch on the CPU.
    """

    def __init__(self, nbytes: int, directory: str) -> None:
        import mmap
        import os
        import tempfile

        import torch

        fd, self.path = tempfile.mkstemp(prefix="kvstore-hostslab-", dir=directory)
        os.ftruncate(fd, nbytes)
        self._map = mmap.mmap(fd, nbytes)
        os.close(fd)
        self._tensor = torch.frombuffer(self._map, dtype=torch.uint8)
        self.nbytes = nbytes
        self.device = 0
        self.pci_bus_id = "host:0"
        self._staging = bytearray()
        self.num_uploads = 0  # uploads done (lets tests see a promotion happen)

    def staging(self, nbytes: int) -> memoryview:
        if len(self._staging) < nbytes:
            self._staging = bytearray(nbytes)
        return memoryview(self._staging)[:nbytes]

    def upload_staged(self, offset: int, nbytes: int) -> int:
        from kvstore.device_checksum import device_checksum

        self._map[offset : offset + nbytes] = self._staging[:nbytes]
        self.num_uploads += 1
        return device_checksum(self._tensor[offset : offset + nbytes])

    def read(self, offset: int, nbytes: int) -> bytes:
        return bytes(self._map[offset : offset + nbytes])

    def corrupt(self, offset: int) -> None:
        """Flip one bit in the slab (device memory gone bad under a lease)."""
        self._map[offset] ^= 1

    def ipc_handle(self) -> bytes:
        return self.path.encode()

    def close(self) -> None:
        import os

        self._tensor = None
        try:
            self._map.close()
        except BufferError:  # a test still holds a view; the GC unmaps it
            pass
        if os.path.exists(self.path):
            os.unlink(self.path)


def open_host_slab(resp):  # -> kvstore.client._gpu.OpenedSlab
    """The client side of `HostSlab`: map the file a LeaseGpuChunks response names."""
    import mmap

    import torch

    from kvstore.client._gpu import OpenedSlab

    with open(resp.ipc_handle.decode(), "r+b") as fh:
        mapped = mmap.mmap(fh.fileno(), resp.slab_bytes)
    tensor = torch.frombuffer(mapped, dtype=torch.uint8)
    return OpenedSlab(tensor, bytes(resp.slab_nonce), lambda: None)
