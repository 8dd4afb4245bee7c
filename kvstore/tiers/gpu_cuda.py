"""The CUDA side of the GPU tier: a slab made with one cudaMalloc, opened by clients via IPC.

The slab is allocated with ``cupy.cuda.Memory`` (a plain cudaMalloc, not a pool):
``cudaIpcGetMemHandle`` wants the base of an allocation, and a pool or torch's
caching allocator would hand out pointers inside larger blocks. torch sees the
same memory through ``__cuda_array_interface__`` (no copy) and does the copies and
the checksums. Uploads go through one pinned staging buffer on the tier's own
stream; every call returns once its copy is complete (the servicer runs it on its
I/O pool, never on the event loop).

cupy and torch are imported lazily, inside the constructor: importing this module
on a CPU-only machine loads neither.
"""

from __future__ import annotations

import logging
from typing import Any

from kvstore.config import GpuTierConfig
from kvstore.device_checksum import MASK64, device_checksum_tensor
from kvstore.errors import Unavailable
from kvstore.tiers.gpu import GpuTier

logger = logging.getLogger(__name__)


def cuda_available() -> bool:
    """True when torch and cupy import and torch sees a CUDA device."""
    try:
        import cupy  # noqa: F401 - the slab's allocator and IPC handles
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


class CudaSlab:
    """A `kvstore.tiers.gpu.DeviceSlab` in HBM (one cudaMalloc of ``nbytes``)."""

    def __init__(self, nbytes: int, device: int) -> None:
        """Raises:
        Unavailable: torch, cupy or the CUDA device is missing.
        """
        if not cuda_available():
            raise Unavailable("the GPU tier needs torch, cupy and a CUDA device; none was found")
        import cupy
        import torch

        self._torch = torch
        self._cupy = cupy
        self.nbytes = nbytes
        self.device = device
        with cupy.cuda.Device(device):
            self._memory = cupy.cuda.Memory(nbytes)  # plain cudaMalloc: an IPC-able base
            array = cupy.ndarray((nbytes,), dtype=cupy.uint8,
                                 memptr=cupy.cuda.MemoryPointer(self._memory, 0))
        self._tensor = torch.as_tensor(array, device=f"cuda:{device}")  # aliases, no copy
        self._array = array
        self._stream = torch.cuda.Stream(device=self._tensor.device)
        self._pinned = torch.empty(0, dtype=torch.uint8, pin_memory=True)
        self.pci_bus_id = str(cupy.cuda.runtime.deviceGetPCIBusId(device))
        self._ipc_handle = bytes(cupy.cuda.runtime.ipcGetMemHandle(self._memory.ptr))
        logger.info("GPU tier slab: %d bytes on cuda:%d", nbytes, device)

    def staging(self, nbytes: int) -> memoryview:
        if self._pinned.numel() < nbytes:
            grown = max(nbytes, 2 * self._pinned.numel())
            self._pinned = self._torch.empty(grown, dtype=self._torch.uint8, pin_memory=True)
        return memoryview(self._pinned.numpy()[:nbytes])

    def upload_staged(self, offset: int, nbytes: int) -> int:
        with self._torch.cuda.stream(self._stream):
            target = self._tensor[offset : offset + nbytes]
            target.copy_(self._pinned[:nbytes], non_blocking=True)
            checksum = device_checksum_tensor(target)
        return int(checksum.item()) & MASK64  # .item() waits for the copy and the sum

    def read(self, offset: int, nbytes: int) -> bytes:
        with self._torch.cuda.stream(self._stream):
            host = self._tensor[offset : offset + nbytes].to("cpu")
        return host.numpy().tobytes()

    def ipc_handle(self) -> bytes:
        return self._ipc_handle

    def view(self) -> Any:
        """The whole slab as a 1-D uint8 CUDA tensor (tests and benchmarks)."""
        return self._tensor

    def close(self) -> None:
        self._stream.synchronize()
        self._tensor = self._array = None  # type: ignore[assignment]
        self._memory = None  # cupy frees it when the last reference goes


def open_gpu_tier(config: GpuTierConfig) -> GpuTier | None:
    """The daemon's GPU tier, or None (logged) when it is off or CUDA is missing."""
    if config.capacity_bytes == 0:
        return None
    try:
        slab = CudaSlab(config.capacity_bytes, config.device)
    except Unavailable as exc:
        logger.warning("tiers.gpu.capacity_bytes is set but %s; running without it", exc)
        return None
    return GpuTier(config, slab)
