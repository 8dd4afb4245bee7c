"""Stored chunks read in place: lease-pinned, read-only views of the daemon's arena.

For consumers that read the bytes where they lie, e.g. a GPU engine that
registers the arena with CUDA and copies host-to-device straight from it: no
copy into client memory at all. The views are valid while the lease lives (the
``with`` block, at most the lease's TTL); the arena is mapped read-only, so a
view can never be written through.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvstore.client._local import _CHECKED_PREFIX, ArenaLease, NotRaw, _check_header
from kvstore.client._tensors import NUMPY_STORAGE
from kvstore.codec.format import HEADER_BYTES, new_object_hasher, read_header, verify_object
from kvstore.errors import Corrupt, InvalidArgument
from kvstore.layout import KVLayout


@dataclass(slots=True)
class ArenaView:
    """The leading stored chunks of a sequence, in place in the daemon's arena.

    ``chunks[c]`` is chunk ``c`` as a read-only ``[layers, 2, heads, T, dim]`` numpy
    array in the layout's storage dtype (bfloat16 as uint16 bits); ``objects[c]``
    is its whole KVC1 object. Covers the chunks DRAM could pin (``num_tokens``;
    the rest, if any, is read with ``get``). Use as a context manager: leaving it
    releases the lease, after which the views must not be read.
    """

    lease: ArenaLease
    chunks: list[np.ndarray] = field(default_factory=list)
    objects: list[memoryview] = field(default_factory=list)
    num_tokens: int = 0  # tokens the views cover: len(chunks) * tokens per chunk

    def verify(self, index: int) -> None:
        """Check chunk ``index``'s checksum (for views opened with ``verify=False`` that
        check each chunk right before reading it, while it is in cache); raises Corrupt."""
        verify_object(self.objects[index])

    def checksum(self, index: int) -> LayerChecksum:
        """Chunk ``index``'s checksum fed layer by layer, for readers that copy it a layer
        at a time (each layer hashed right before it is read, while it is in cache)."""
        return LayerChecksum(self.objects[index], self.chunks[index], index)

    def release(self) -> Any:
        """Drop the views and end the lease (``AsyncClient``: returns an awaitable)."""
        self.chunks, self.objects = [], []
        return self.lease.release()

    def __enter__(self) -> ArenaView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    async def __aenter__(self) -> ArenaView:
        return self

    async def __aexit__(self, *exc: object) -> None:
        pending = self.release()
        if pending is not None:
            await pending


def open_view(lease: ArenaLease, layout: KVLayout, tokens_per_chunk: int,
              verify: bool) -> ArenaView:
    """Views of a lease's raw objects, checked against the layout (and their checksums
    when ``verify``); the caller releases the lease if a check fails.

    Raises:
        Corrupt: a header (or, with ``verify``, a checksum) is wrong.
        InvalidArgument: a chunk is stored compressed (kvq): it has no raw bytes to view.
    """
    view = ArenaView(lease, num_tokens=len(lease.extents) * tokens_per_chunk)
    storage = NUMPY_STORAGE[layout.dtype]
    shape = (layout.num_layers, 2, layout.num_kv_heads, tokens_per_chunk, layout.head_dim)
    for index, extent in enumerate(lease.extents):
        obj = lease.reader.view(extent)
        try:
            header = _check_header(obj, index, layout, tokens_per_chunk)
        except NotRaw as exc:
            raise InvalidArgument(f"{exc}: compressed chunks cannot be read in place; "
                                  "use get()") from None
        if verify:
            verify_object(obj)
        table_end = HEADER_BYTES + 4 * header.num_sections
        view.objects.append(obj)
        view.chunks.append(np.frombuffer(obj[table_end:], dtype=storage).reshape(shape))
    return view


class LayerChecksum:
    """The KVC1 checksum of one viewed chunk, computed as its layers are read in order.

    ``update(layer)`` must be called for layers 0, 1, ... in turn (the object
    stores them in that order, and the checksum is a stream hash over it);
    ``check()`` after the last layer raises Corrupt unless the object is intact.
    Nothing read before ``check()`` returns is known to be good.
    """

    def __init__(self, obj: memoryview, chunk: np.ndarray, index: int) -> None:
        header = read_header(obj)
        self._hasher = new_object_hasher(obj[:_CHECKED_PREFIX])
        self._hasher.update(obj[HEADER_BYTES:HEADER_BYTES + 4 * header.num_sections])
        self._expected = header.checksum
        self._chunk = chunk  # [layers, 2, heads, T, dim]; each layer is contiguous
        self._index = index
        self._next_layer = 0

    def update(self, layer: int) -> None:
        if layer != self._next_layer:
            raise InvalidArgument(f"chunk {self._index}: checksum fed layer {layer}, "
                                  f"expected layer {self._next_layer} (layers go in order)")
        self._hasher.update(self._chunk[layer])
        self._next_layer += 1

    def check(self) -> None:
        """Raise Corrupt unless every layer was fed and the checksum matches."""
        if self._next_layer != len(self._chunk):
            raise InvalidArgument(f"chunk {self._index}: checksum fed {self._next_layer} of "
                                  f"{len(self._chunk)} layers")
        actual = self._hasher.intdigest()
        if actual != self._expected:
            raise Corrupt(f"arena chunk {self._index}: checksum {actual:#018x} of the bytes "
                          f"read, object header says {self._expected:#018x}")
