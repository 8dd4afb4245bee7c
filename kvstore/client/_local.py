"""The client's same-host path: map the daemon's arena, copy leased chunks out, verify.

How a client picks its path (``transport``):
- ``"auto"``: the arena when the daemon's address is a loopback address, AttachArena
  succeeds, the boot ids agree and the file's header carries the daemon's nonce;
  the streamed path otherwise, and whenever an arena read cannot complete.
- ``"arena"``: the arena or an error saying why not (reads never silently stream).
- ``"stream"``: always the streamed Get.

Every object copied out is verified against its KVC1 checksum *as copied*: the
hash runs over the bytes written into the output (in the object's own order),
so neither a daemon bug nor a lease that failed to protect the bytes can hand
back anything but the stored chunk.

Chunks stored compressed (kvq) are decoded here, by the client, on the CPU: the
lease hands out stored objects, and decoding in the daemon would need scratch
DRAM per read. The object is copied out of the arena first, then verified and
decoded from the copy, with the decoder the daemon's Get uses (same bits).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvstore._proto import kvstore_pb2 as pb
from kvstore.arena_file import ArenaReader, Extent, host_boot_id
from kvstore.client._codec import decode_kvq_into
from kvstore.client._tensors import NUMPY_STORAGE, from_storage, is_torch_tensor, to_storage
from kvstore.codec.format import HEADER_BYTES, CodecId, new_object_hasher, read_header
from kvstore.copy_threads import CopyThreads
from kvstore.errors import Corrupt, InvalidArgument, NotFound
from kvstore.layout import KVLayout

log = logging.getLogger(__name__)

TRANSPORTS = ("auto", "arena", "stream")
_CHECKED_PREFIX = 40  # header bytes the KVC1 checksum covers (see codec/format.py)


class NotRaw(Exception):
    """A leased object's codec has no decoder here: the daemon must decode it (use Get)."""


def is_loopback_address(address: str) -> bool:
    """True for "127.x.y.z:port", "[::1]:port", "localhost:port" or a unix socket."""
    if address.startswith("unix:"):
        return True
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(slots=True)
class MappedArena:
    """A daemon's arena mapped by this client: read-only, plus read-write once it puts."""

    reader: ArenaReader
    nonce: bytes  # proves the mapping is the daemon's arena; sent with LeaseChunks
    writer: ArenaReader | None = None  # mapped at the first same-host put

    def writable(self) -> ArenaReader:
        """The read-write mapping (same-host puts write only into reserved extents)."""
        if self.writer is None:
            self.writer = ArenaReader(self.reader.path, nonce=self.nonce, writable=True)
        return self.writer

    def close(self) -> None:
        self.reader.close()
        if self.writer is not None:
            self.writer.close()


def attach(resp: pb.AttachArenaResponse) -> MappedArena:
    """Map the arena an AttachArena response names and check it is the daemon's.

    Raises:
        NotFound: another host (boot ids differ) or the file cannot be mapped.
        Corrupt: the file is not the daemon's arena (nonce or size differ).
    """
    boot_id = host_boot_id()
    if resp.boot_id and boot_id and resp.boot_id != boot_id:
        raise NotFound(f"the daemon runs on another host (boot id {resp.boot_id}, ours "
                       f"{boot_id}); its arena cannot be mapped here")
    reader = ArenaReader(resp.path, nonce=resp.nonce)
    if reader.nbytes != resp.file_bytes:
        reader.close()
        raise Corrupt(f"arena {resp.path} is {reader.nbytes} bytes, the daemon says "
                      f"{resp.file_bytes}")
    log.info("mapped the daemon's arena %s (%d bytes, hugepages %s)", resp.path,
             resp.file_bytes, resp.hugepages or "off")
    return MappedArena(reader, bytes(resp.nonce))


@dataclass(slots=True)
class ArenaLease:
    """Chunks of a sequence pinned in the daemon's arena for this client.

    ``extents[c]`` holds stored chunk ``c`` (a KVC1 object, unverified: check it
    before use) until ``release`` or the TTL. Use as a context manager.
    """

    reader: ArenaReader  # the mapped arena; ``reader.view(extent)`` reads an object
    extents: list[Extent]  # one per leading chunk pinned, in chunk order
    num_chunks_stored: int  # leading chunks stored in any tier (>= len(extents))
    lease_id: int  # 0 when nothing was pinned
    ttl_s: float  # the lease ends by itself this long after it was granted
    _release: Any = field(default=None, repr=False)  # callable(lease_id) -> None

    def release(self) -> Any:
        """Unpin the chunks now; a lease from ``AsyncClient`` returns an awaitable."""
        lease_id, self.lease_id = self.lease_id, 0
        return None if self._release is None else self._release(lease_id)

    def __enter__(self) -> ArenaLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    async def __aenter__(self) -> ArenaLease:
        return self

    async def __aexit__(self, *exc: object) -> None:
        pending = self.release()
        if pending is not None:
            await pending


def extents_of(resp: pb.LeaseChunksResponse) -> list[Extent]:
    return [Extent(e.offset_bytes, e.length_bytes) for e in resp.extents]


def new_output(layout: KVLayout, num_layers: int, num_tokens: int) -> np.ndarray:
    """``[num_layers, 2, heads, num_tokens, dim]`` in the layout's storage dtype."""
    return np.empty((num_layers, 2, layout.num_kv_heads, num_tokens, layout.head_dim),
                    dtype=NUMPY_STORAGE[layout.dtype])


def copy_chunks(reader: ArenaReader, extents: Sequence[Extent], layout: KVLayout,
                tokens_per_chunk: int, layers: Sequence[int], out: np.ndarray, *,
                verify: bool = True, threads: CopyThreads | None = None) -> None:
    """Copy leased objects into ``out`` ([len(layers), 2, heads, n * T, dim]), verified
    (unless ``verify`` is False: then only headers are checked).

    ``threads``: split the objects across its threads (each object whole on one).
    On an exception ``out`` may hold any bytes (parts of chunks, unverified ones
    included); no thread writes to it any more once this returns or raises.

    Raises:
        Corrupt: an object's header or checksum is wrong.
        NotRaw: an object is stored with a codec other than raw or kvq.
    """
    positions = {layer: i for i, layer in enumerate(layers)}

    def job(index: int, extent: Extent) -> Callable[[], None]:
        def copy() -> None:
            view = reader.view(extent)
            dst = out[:, :, :, index * tokens_per_chunk:(index + 1) * tokens_per_chunk, :]
            if read_header(view).codec_id == CodecId.KVQ:
                decode_kvq_into(bytes(view), index, layout, tokens_per_chunk, positions, dst)
            else:
                _copy_object(view, index, layout, tokens_per_chunk, positions, dst,
                             verify=verify)
        return copy

    jobs = [job(index, extent) for index, extent in enumerate(extents)]
    (threads or CopyThreads(1)).run(jobs, sum(extent.length for extent in extents))


def _check_header(view: memoryview, index: int, layout: KVLayout, num_tokens: int) -> Any:
    header = read_header(view)  # range checks; raises Corrupt
    if header.codec_id != CodecId.RAW:
        raise NotRaw(f"chunk {index} is stored with codec id {header.codec_id}")
    seen = (header.dtype, header.num_layers, header.num_kv_heads, header.head_dim,
            header.num_tokens, header.num_sections, header.meta_bytes)
    want = (layout.dtype, layout.num_layers, layout.num_kv_heads, layout.head_dim, num_tokens,
            2 * layout.num_layers, 0)
    if seen != want:
        raise Corrupt(f"arena chunk {index}: (dtype, layers, heads, head_dim, tokens, sections, "
                      f"meta) is {seen}, expected {want}")
    return header


def _copy_object(view: memoryview, index: int, layout: KVLayout, num_tokens: int,
                 positions: dict[int, int], dst: np.ndarray, *, verify: bool = True) -> None:
    """Copy one raw object into ``dst`` ([len(layers), 2, heads, T, dim]) and verify it.

    The checksum is fed, in the object's order, with the bytes *written* for the
    layers asked for and with the source bytes of the layers skipped. Each
    (layer, K|V) section is hashed right after its copy, while it is still in
    cache (512 KiB for Llama-8B's 8 heads x 256 tokens x 128 dims: the L2 here),
    so memory is read once; what remains is the hash's CPU time (XXH3 measured at
    6-16 GB/s on the loaded VM, against a ~5 GB/s copy), which ``CopyThreads``
    overlaps across objects. ``verify=False`` skips it for callers that trust the lease.
    """
    header = _check_header(view, index, layout, num_tokens)
    table_end = HEADER_BYTES + 4 * header.num_sections
    storage = NUMPY_STORAGE[layout.dtype]
    # [layers, 2, heads, T, dim]
    src = np.frombuffer(view[table_end:], dtype=storage).reshape(
        layout.num_layers, 2, layout.num_kv_heads, num_tokens, layout.head_dim)
    if not verify:
        if len(positions) == layout.num_layers:
            np.copyto(dst, src)
        else:
            for layer, position in positions.items():
                np.copyto(dst[position], src[layer])
        return
    digest = new_object_hasher(view[:_CHECKED_PREFIX])
    digest.update(view[HEADER_BYTES:table_end])
    for layer in range(layout.num_layers):
        position = positions.get(layer)
        if position is None:
            digest.update(src[layer])  # contiguous [2, heads, T, dim]
            continue
        for kv in range(2):
            section = dst[position, kv]  # [heads, T, dim], strided along tokens
            np.copyto(section, src[layer, kv])
            for head in section:
                digest.update(head)  # contiguous [T, dim], just written
    if digest.intdigest() != header.checksum:
        raise Corrupt(f"arena chunk {index}: checksum {digest.intdigest():#018x} of the bytes "
                      f"copied, object header says {header.checksum:#018x}")


STREAM = object()  # "use the streamed path" marker returned by the arena path


def check_out(out: Any, layout: KVLayout, num_layers: int, num_tokens: int) -> np.ndarray:
    """The storage-dtype numpy view of a caller's ``get(out=...)`` buffer.

    ``out`` is a C-contiguous CPU torch tensor or numpy array in the layout's dtype,
    ``[num_layers, 2, heads, >= num_tokens, dim]`` (a bfloat16 numpy buffer is
    uint16 bits). Checked before any RPC, so a wrong buffer costs nothing.

    Raises:
        InvalidArgument: naming what was expected and what was seen.
    """
    want = f"[{num_layers}, 2, {layout.num_kv_heads}, >= {num_tokens}, {layout.head_dim}]"
    shape = tuple(getattr(out, "shape", ()))
    if len(shape) != 5 or shape[:3] != (num_layers, 2, layout.num_kv_heads) or \
            shape[4] != layout.head_dim or shape[3] < num_tokens:
        raise InvalidArgument(f"out has shape {shape}, get needs {want} [layers, 2, kv_heads, "
                              "tokens, head_dim]")
    if is_torch_tensor(out):
        if out.device.type != "cpu":
            raise InvalidArgument(f"out is on {out.device}; get(out=) fills CPU buffers")
        if not out.is_contiguous():
            raise InvalidArgument(f"out is not contiguous (strides {out.stride()}); pass a "
                                  "contiguous tensor")
        if out.requires_grad:
            raise InvalidArgument("out requires grad; pass a tensor without autograd history")
    elif not isinstance(out, np.ndarray):
        raise InvalidArgument(f"out must be a torch.Tensor or numpy.ndarray, got "
                              f"{type(out).__name__}")
    elif not (out.flags.c_contiguous and out.flags.writeable):
        raise InvalidArgument("out must be a writable C-contiguous numpy array")
    return to_storage(out, layout)  # a view; raises InvalidArgument on a dtype mismatch


def out_tokens(arr: np.ndarray, layout: KVLayout, position_free: bool) -> int:
    """Tokens a ``get`` of ``arr`` can return at most (whole chunks, or the RAG chunk)."""
    return arr.size if position_free else arr.size // layout.chunk_tokens * layout.chunk_tokens


def deliver(got: Any, out: Any, dest: np.ndarray | None, dtype: str, *, as_numpy: bool) -> Any:
    """What ``get`` returns for ``got`` (an array or None): a new array, or ``out``'s
    leading tokens (filled here if ``got`` came from the stream into a new array)."""
    if got is None:
        return None
    if out is None:
        return from_storage(got, dtype, as_numpy=as_numpy)
    num_tokens = got.shape[3]
    filled = dest[:, :, :, :num_tokens]
    if not np.may_share_memory(got, filled):
        np.copyto(filled, got)
    return out[:, :, :, :num_tokens]


class LocalPath:
    """Per-address state of the same-host path: mapped arenas and the transport choice."""

    def __init__(self, transport: str, copy_threads: int | None = None) -> None:
        if transport not in TRANSPORTS:
            raise InvalidArgument(f"transport must be one of {TRANSPORTS}, got {transport!r}")
        self.transport = transport
        self.threads = CopyThreads(copy_threads)  # splits large copies across cores
        self._arenas: dict[int, MappedArena | None] = {}  # None: the arena is refused there

    def wants(self, index: int, address: str) -> bool:
        """Whether a read from ``address`` should try the arena."""
        if self.transport == "stream" or self._arenas.get(index, True) is None:
            return False
        return self.transport == "arena" or is_loopback_address(address)

    def mapped(self, index: int) -> MappedArena | None:
        return self._arenas.get(index)

    def remember(self, index: int, arena: MappedArena | None) -> None:
        self._arenas[index] = arena

    def forget(self, index: int) -> None:
        arena = self._arenas.pop(index, None)
        if arena is not None:
            arena.close()

    def fallback(self, index: int, address: str, exc: Exception, *, refused: bool) -> object:
        """After an arena failure: raise when forced, else stream (and maybe stop trying)."""
        if self.transport == "arena":
            raise exc
        if refused:
            log.info("arena path of %s refused (%s); streaming from now on", address, exc)
            self.forget(index)
            self._arenas[index] = None
        else:
            log.warning("arena read from %s failed (%s); streaming this read", address, exc)
            self.forget(index)
        return STREAM

    def read(self, lease: ArenaLease, layout: KVLayout, tokens_per_chunk: int,
             layers: Sequence[int], dest: np.ndarray | None = None, verify: bool = True
             ) -> np.ndarray | object | None:
        """Copy a lease's chunks out; STREAM when it pinned fewer chunks than are stored.

        ``dest`` (from ``check_out``): copy into its leading tokens and return that
        view instead of allocating.
        """
        if lease.num_chunks_stored == 0:
            return None
        if len(lease.extents) < lease.num_chunks_stored:
            return STREAM  # the rest lives where DRAM could not pin it: Get has it all
        num_tokens = len(lease.extents) * tokens_per_chunk
        out = new_output(layout, len(layers), num_tokens) if dest is None else \
            dest[:, :, :, :num_tokens]
        copy_chunks(lease.reader, lease.extents, layout, tokens_per_chunk, layers, out,
                    verify=verify, threads=self.threads)
        return out

    def close(self) -> None:
        for index in list(self._arenas):
            self.forget(index)
        self.threads.close()
