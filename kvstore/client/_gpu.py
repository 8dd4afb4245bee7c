"""The client's same-host GPU path: open the daemon's GPU slab, copy chunks device to device.

When a caller asks for device output (``get(..., device="cuda")``) and the daemon
is on this host, the client asks for a GPU lease (LeaseGpuChunks), opens the
daemon's slab once through its CUDA IPC handle (reopened when the slab's nonce
changes), copies each leased chunk's payload into the output tensor with one
device-to-device copy, and verifies every chunk *as copied*: the device checksum
(``kvstore.device_checksum``) of the object's header and section table read from
the slab plus the bytes written into the output must equal the one the daemon
computed when the chunk entered HBM. All chunks' sums come back in one transfer.

Fallbacks (``GpuPath.fallback``): a daemon without a GPU tier (FAILED_PRECONDITION)
or a refusing one (PERMISSION_DENIED) is not asked again; any other failure (a
handle that cannot be opened, a chunk that fails verification, fewer chunks leased
than stored) falls back for this read only. The caller then reads through the
arena, then the stream, and moves the result to the device.

torch and cupy are imported lazily: only a caller asking for device output loads them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kvstore._proto import kvstore_pb2 as pb
from kvstore.arena_file import host_boot_id
from kvstore.client._local import STREAM, NotRaw
from kvstore.codec.format import HEADER_BYTES, CodecId, read_header
from kvstore.device_checksum import MASK64, MULTIPLIER
from kvstore.errors import (
    Corrupt,
    FailedPrecondition,
    KVStoreError,
    NotFound,
    PermissionDenied,
)
from kvstore.layout import KVLayout

log = logging.getLogger(__name__)


@dataclass(slots=True)
class OpenedSlab:
    """The daemon's GPU slab as seen from this process."""

    tensor: Any  # 1-D uint8 torch tensor aliasing the slab (no copy)
    nonce: bytes  # LeaseGpuChunksResponse.slab_nonce of the slab this is
    close: Callable[[], None]  # unmaps it (cudaIpcCloseMemHandle)


SlabOpener = Callable[[pb.LeaseGpuChunksResponse], OpenedSlab]


def open_cuda_slab(resp: pb.LeaseGpuChunksResponse) -> OpenedSlab:
    """Open a slab's CUDA IPC handle on the device its PCI bus id names.

    Raises:
        NotFound: another host, or CUDA refuses the handle (other user, no device).
    """
    boot_id = host_boot_id()
    if resp.boot_id and boot_id and resp.boot_id != boot_id:
        raise NotFound(f"the daemon runs on another host (boot id {resp.boot_id}); its GPU "
                       "slab cannot be opened here")
    try:
        import cupy
        import torch

        runtime = cupy.cuda.runtime
        device = runtime.deviceGetByPCIBusId(resp.pci_bus_id)
        with cupy.cuda.Device(device):
            ptr = runtime.ipcOpenMemHandle(resp.ipc_handle,
                                           runtime.cudaIpcMemLazyEnablePeerAccess)
        memory = cupy.cuda.UnownedMemory(ptr, resp.slab_bytes, resp, device_id=device)
        array = cupy.ndarray((resp.slab_bytes,), dtype=cupy.uint8,
                             memptr=cupy.cuda.MemoryPointer(memory, 0))
        tensor = torch.as_tensor(array, device=f"cuda:{device}")
    # ImportError, CUDA errors (another user, or the daemon's own process: CUDA cannot
    # open a handle in the process that exported it): this read falls back.
    except Exception as exc:
        raise NotFound(f"cannot open the daemon's GPU slab on {resp.pci_bus_id}: {exc}") from exc

    def close() -> None:
        with cupy.cuda.Device(device):
            runtime.ipcCloseMemHandle(ptr)

    log.info("opened the daemon's GPU slab (%d bytes on %s)", resp.slab_bytes, resp.pci_bus_id)
    return OpenedSlab(tensor, bytes(resp.slab_nonce), close)


def lease_request(namespace: pb.Namespace, tokens: Any, position_free: bool
                  ) -> pb.LeaseGpuChunksRequest:
    return pb.LeaseGpuChunksRequest(namespace=namespace, tokens_le_i32=tokens.tobytes(),
                                    position_free=position_free)


def on_device(result: Any, device: Any, as_numpy: bool) -> Any:
    """A get's result moved to ``device`` (arena and stream reads land on the host)."""
    if result is None or device is None or as_numpy:
        return result
    return result.to(device)


def torch_dtype(name: str) -> Any:
    import torch

    return {"float16": torch.float16, "bfloat16": torch.bfloat16,
            "float32": torch.float32}[name]


def copy_chunks(slab: Any, extents: Sequence[pb.GpuChunkExtent], layout: KVLayout,
                tokens_per_chunk: int, layers: Sequence[int], out: Any) -> None:
    """Copy leased raw objects from ``slab`` into ``out`` and verify them as copied.

    Two transfers whatever the number of chunks: every header and section table
    comes back in one (checked against the layout before anything is copied), then,
    after one fused copy-and-sum launch over all rows, every chunk's checksum.

    Args:
        slab: the opened slab (1-D uint8 tensor).
        out: ``[len(layers), 2, heads, len(extents) * T, dim]`` contiguous tensor of the
            layout's dtype on the slab's device.

    Raises:
        Corrupt: a header, or the checksum of the bytes copied, is wrong.
        NotRaw: an object is not raw (the arena path decodes those).
    """
    import torch

    from kvstore.kernels.chunk_copy import copy_rows  # only when copying to a device

    num_chunks = len(extents)
    words = slab[: slab.numel() // 4 * 4].view(torch.int32)
    prefix_words = (HEADER_BYTES + 8 * layout.num_layers) // 4  # header + section table
    starts = torch.tensor([e.offset_bytes // 4 for e in extents], dtype=torch.int64,
                          device=slab.device)
    prefixes = words[starts[:, None] + torch.arange(prefix_words, device=slab.device)]
    host = prefixes.cpu().numpy()  # [chunks, prefix_words]: the first transfer
    for index, extent in enumerate(extents):
        _check_header(memoryview(host[index]).cast("B"), extent.length_bytes, index, layout,
                      tokens_per_chunk)
    plan = _row_plan(starts, prefix_words, layout, tokens_per_chunk, layers, num_chunks)
    out_words = out.view(-1).view(torch.int32)
    row_sums = copy_rows(words, out_words, plan.src, plan.dst, plan.start, plan.row_words)
    weights = torch.arange(prefix_words, device=slab.device) * MULTIPLIER + 1
    totals = ((prefixes.to(torch.int64) & 0xFFFFFFFF) * weights).sum(1)
    totals = totals + row_sums.view(num_chunks, -1).sum(1)
    got = totals.cpu().tolist()  # the second transfer; it also waits for the copies
    for index, (extent, value) in enumerate(zip(extents, got, strict=True)):
        if value & MASK64 != extent.device_checksum:
            raise Corrupt(f"GPU chunk {index}: device checksum {value & MASK64:#018x} of the "
                          f"bytes copied, the daemon says {extent.device_checksum:#018x}")


@dataclass(frozen=True, slots=True)
class _RowPlan:
    """One row per (chunk, layer, K|V, head): ``T * dim`` elements, contiguous both sides."""

    src: Any  # int64 [rows]: first word of the row in the slab
    dst: Any  # int64 [rows]: first word in the output, -1 for layers not asked for
    start: Any  # int64 [rows]: word index of the row within its object (checksum weights)
    row_words: int  # words per row


def _row_plan(starts: Any, prefix_words: int, layout: KVLayout, tokens: int,
              layers: Sequence[int], num_chunks: int) -> _RowPlan:
    import torch

    row_bytes = tokens * layout.head_dim * layout.itemsize
    if row_bytes % 4:
        raise NotRaw(f"rows of {row_bytes} bytes are not whole 32-bit words")
    row_words = row_bytes // 4
    device = starts.device
    rows_per_layer = 2 * layout.num_kv_heads
    rows = torch.arange(layout.num_layers * rows_per_layer, device=device)  # object order
    position = torch.full((layout.num_layers,), -1, dtype=torch.int64, device=device)
    position[torch.tensor(list(layers), device=device)] = torch.arange(len(layers),
                                                                       device=device)
    out_row = position[rows // rows_per_layer] * rows_per_layer + rows % rows_per_layer
    chunk = torch.arange(num_chunks, device=device)[:, None]
    start = prefix_words + rows * row_words  # [rows]
    src = starts[:, None] + start  # [chunks, rows]
    # out is [layers asked, 2, heads, chunks * T, dim]: output row r holds every chunk's
    # tokens, chunk c at word c * row_words within it.
    dst = out_row * (num_chunks * row_words) + chunk * row_words
    dst = torch.where(out_row >= 0, dst, torch.full_like(dst, -1))
    return _RowPlan(src.reshape(-1), dst.reshape(-1), start.expand(num_chunks, -1).reshape(-1),
                    row_words)


def _check_header(prefix: memoryview, object_bytes: int, index: int, layout: KVLayout,
                  num_tokens: int) -> None:
    """A raw chunk of ``layout`` with no codec metadata, or Corrupt / NotRaw."""
    header = read_header(prefix, object_bytes)
    if header.codec_id != CodecId.RAW:
        raise NotRaw(f"GPU chunk {index} is stored with codec id {header.codec_id}")
    seen = (header.dtype, header.num_layers, header.num_kv_heads, header.head_dim,
            header.num_tokens, header.num_sections, header.meta_bytes, header.payload_bytes)
    payload = 4 * 2 * layout.num_layers + (layout.num_layers * 2 * layout.num_kv_heads
                                            * num_tokens * layout.head_dim * layout.itemsize)
    want = (layout.dtype, layout.num_layers, layout.num_kv_heads, layout.head_dim, num_tokens,
            2 * layout.num_layers, 0, payload)
    if seen != want:
        raise Corrupt(f"GPU chunk {index}: (dtype, layers, heads, head_dim, tokens, sections, "
                      f"meta, payload bytes) is {seen}, expected {want}")


class GpuPath:
    """Per-address state of the GPU path: opened slabs and which daemons refuse it."""

    def __init__(self, opener: SlabOpener = open_cuda_slab,
                 device_types: tuple[str, ...] = ("cuda",)) -> None:
        """Args:
        opener: opens a slab from a lease response (tests pass a host-memory one).
        device_types: output devices this path serves ("cuda"; tests add "cpu").
        """
        self._opener = opener
        self._device_types = device_types
        self._slabs: dict[int, OpenedSlab | None] = {}  # None: the daemon refuses the path

    def wants(self, index: int, device: Any) -> bool:
        """Whether a read for ``device`` from daemon ``index`` should try the GPU path."""
        if device is None or self._slabs.get(index, True) is None:
            return False
        import torch

        return torch.device(device).type in self._device_types

    def slab(self, index: int, resp: pb.LeaseGpuChunksResponse) -> OpenedSlab:
        """The opened slab of a lease response, opening (or reopening) it if needed."""
        opened = self._slabs.get(index)
        if opened is not None and opened.nonce == bytes(resp.slab_nonce):
            return opened
        self.forget(index)
        opened = self._opener(resp)
        self._slabs[index] = opened
        return opened

    def read(self, index: int, resp: pb.LeaseGpuChunksResponse, layout: KVLayout,
             tokens_per_chunk: int, layers: Sequence[int], device: Any) -> Any:
        """The leased chunks as a tensor on ``device``; None if nothing is stored.

        Raises:
            Corrupt, NotRaw, NotFound: the caller falls back for this read.
        """
        import torch

        if resp.num_chunks_stored == 0:
            return None
        if len(resp.extents) < resp.num_chunks_stored:
            raise NotFound(f"only {len(resp.extents)} of {resp.num_chunks_stored} stored "
                           "chunks could be placed in the daemon's GPU tier")
        slab = self.slab(index, resp).tensor
        out = torch.empty((len(layers), 2, layout.num_kv_heads,
                           len(resp.extents) * tokens_per_chunk, layout.head_dim),
                          dtype=torch_dtype(layout.dtype), device=device)
        copy_chunks(slab, resp.extents, layout, tokens_per_chunk, layers, out)
        return out

    def read_lease(self, index: int, address: str, resp: pb.LeaseGpuChunksResponse,
                   layout: KVLayout, tokens_per_chunk: int, layers: Sequence[int],
                   device: Any) -> Any:
        """``read``, with failures turned into a fallback: a tensor, None or STREAM.

        The caller releases the lease afterwards; every copy has completed by then
        (reading the checksums back waited for them).
        """
        try:
            return self.read(index, resp, layout, tokens_per_chunk, layers, device)
        except (KVStoreError, NotRaw) as exc:
            self.fallback(index, address, exc)
            return STREAM

    def fallback(self, index: int, address: str, exc: Exception) -> None:
        """After a GPU-path failure: stop asking a daemon that refuses, log the rest."""
        if isinstance(exc, FailedPrecondition | PermissionDenied):
            log.info("GPU path of %s unavailable (%s); using the arena or Get", address, exc)
            self.forget(index)
            self._slabs[index] = None
        else:
            log.warning("GPU read from %s failed (%s); reading elsewhere this time", address,
                        exc)
            self.forget(index)

    def is_open(self, index: int) -> bool:
        """Whether daemon ``index``'s slab is opened (a GPU-path read got that far)."""
        return self._slabs.get(index) is not None

    def is_refused(self, index: int) -> bool:
        return index in self._slabs and self._slabs[index] is None

    def forget(self, index: int) -> None:
        opened = self._slabs.pop(index, None)
        if opened is not None:
            opened.close()

    def close(self) -> None:
        for index in list(self._slabs):
            self.forget(index)


__all__ = ["GpuPath", "NotRaw", "OpenedSlab", "copy_chunks", "open_cuda_slab"]
