"""Where the decoder's values (and exact pre-RoPE keys) come from: block sources.

A block is ``block_tokens`` consecutive tokens of one (layer, K|V, kv head):
``block_tokens * head_dim`` contiguous elements. The decoder asks a
:class:`BlockSource` to ``gather`` the blocks it missed into resident slots.

- :class:`HostBlockPool`: an in-process host tensor (pinned when CUDA is present)
  that the Triton gather kernel indexes directly; also the writable store that
  prefill and sealing fill.
- :class:`ArenaBlockSource`: the daemon's mapped DRAM arena (read-only), over raw
  KVC1 chunk objects whose extents the daemon leased to us; blocks past the last
  full stored chunk come from a small client-side pool.
- :class:`RemoteBlockSource`: for clients that cannot map the arena — one batched
  ``FetchBlocks`` call per (layer, K|V) and step through a :class:`BlockFetcher`
  (:class:`ClientBlockFetcher` adapts a ``kvstore.client.Client``).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from kvstore.arena_file import ArenaReader, Extent
from kvstore.codec.raw import raw_payload
from kvstore.errors import InvalidArgument
from kvstore.kernels.sparse_gather import gather
from kvstore.layout import DTYPE_ITEMSIZE
from kvstore.models.dtypes import TORCH_DTYPES
from kvstore.models.rope import rotate

log = logging.getLogger(__name__)

KIND_KEY = 0  # exact pre-RoPE keys
KIND_VALUE = 1
Rope = tuple[torch.Tensor, float]  # (inv_freq [D/2], attention scaling)


@dataclass(frozen=True, slots=True)
class BlockGeometry:
    """Shape of the block store of one sequence."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_tokens: int = 8
    dtype: str = "float16"  # storage dtype of keys and values

    @property
    def block_bytes(self) -> int:
        return self.block_tokens * self.head_dim * DTYPE_ITEMSIZE[self.dtype]

    @property
    def torch_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.dtype]


@runtime_checkable
class BlockSource(Protocol):
    """Gathers blocks into resident slots; returns the bytes it read from the store."""

    geometry: BlockGeometry

    def gather(self, layer: int, kind: int, blocks: torch.Tensor, slots: torch.Tensor,
               out: torch.Tensor, rope: Rope | None = None) -> int:
        """``out[h, slots[h, i]] = block blocks[h, i]`` where ``slots >= 0`` (RoPE'd if set).

        blocks/slots: ``[Hkv, K]`` int64; out: ``[Hkv, S, block_tokens, head_dim]``.
        """
        ...


@runtime_checkable
class BlockStore(BlockSource, Protocol):
    """A block source that also takes new blocks (prefill, and sealing during decode)."""

    def write(self, layer: int, kind: int, first_block: int, blocks: torch.Tensor) -> None:
        """Store ``blocks [Hkv, n, T, D]`` as blocks ``first_block ..`` of (layer, kind)."""
        ...


class BlockFetcher(Protocol):
    """The daemon's batched FetchBlocks, as a client would expose it (see module doc)."""

    def fetch_blocks(self, layer: int, kind: int, heads: Sequence[int],
                     blocks: Sequence[int]) -> bytes:
        """Blocks ``(heads[i], blocks[i])`` of ``(layer, kind)``, concatenated in request order."""
        ...


class ClientBlockFetcher:
    """A :class:`BlockFetcher` over ``Client.fetch_blocks`` for one stored sequence.

    ``client`` is a ``kvstore.client.Client`` (duck-typed: anything with that
    ``fetch_blocks``); ``tokens`` the sequence whose stored chunks hold the blocks.
    """

    def __init__(self, client: Any, tokens: Any, block_tokens: int = 8) -> None:
        self.client, self.tokens, self.block_tokens = client, tokens, block_tokens

    def fetch_blocks(self, layer: int, kind: int, heads: Sequence[int],
                     blocks: Sequence[int]) -> bytes:
        return self.client.fetch_blocks(self.tokens, layer, kind, heads, blocks,
                                        block_tokens=self.block_tokens)


def _count_bytes(slots: torch.Tensor, geometry: BlockGeometry) -> int:
    return int((slots >= 0).sum()) * geometry.block_bytes


class HostBlockPool:
    """Blocks ``first_block ..`` of one sequence in one host tensor ``[L, 2, Hkv, cap, T, D]``.

    Block ids are absolute (position ``b * T`` onwards), so a pool holding only the
    tail of a sequence still rotates exact keys to the right positions.
    """

    def __init__(self, geometry: BlockGeometry, capacity_blocks: int, *, first_block: int = 0,
                 pin: bool | None = None) -> None:
        self.geometry, self.first_block = geometry, first_block
        self.pin = torch.cuda.is_available() if pin is None else pin
        self.capacity_blocks = 0
        self.data = torch.empty(0)
        self.reserve(capacity_blocks)

    def reserve(self, capacity_blocks: int) -> None:
        """Grow to hold at least ``capacity_blocks`` blocks per (layer, K|V, head)."""
        if capacity_blocks <= self.capacity_blocks:
            return
        g = self.geometry
        shape = (g.num_layers, 2, g.num_kv_heads, capacity_blocks, g.block_tokens, g.head_dim)
        data = torch.zeros(shape, dtype=g.torch_dtype, pin_memory=self.pin)
        if self.capacity_blocks:
            data[:, :, :, : self.capacity_blocks] = self.data
        self.data, self.capacity_blocks = data, capacity_blocks
        rows = torch.arange(g.num_layers * 2 * g.num_kv_heads * capacity_blocks, dtype=torch.int64)
        rows = rows.view(g.num_layers, 2, g.num_kv_heads, capacity_blocks)
        self._offsets = torch.zeros(g.num_layers, 2, g.num_kv_heads,
                                    self.first_block + capacity_blocks, dtype=torch.int64)
        self._offsets[..., self.first_block :] = rows * (g.block_tokens * g.head_dim)

    def write(self, layer: int, kind: int, first_block: int, blocks: torch.Tensor) -> None:
        """Store ``blocks [Hkv, n, T, D]`` as blocks ``first_block ..`` of (layer, kind)."""
        start = first_block - self.first_block
        if start < 0:
            raise InvalidArgument(f"block {first_block} is below this pool's first block "
                                  f"{self.first_block}")
        end = start + blocks.shape[1]
        if end > self.capacity_blocks:
            self.reserve(max(end, 2 * self.capacity_blocks))
        self.data[layer, kind, :, start:end] = blocks.to(self.data.dtype)

    def read(self, layer: int, kind: int, first_block: int, num_blocks: int) -> torch.Tensor:
        """A copy of blocks ``[Hkv, n, T, D]`` (prefill reload, dense layers)."""
        start = first_block - self.first_block
        return self.data[layer, kind, :, start : start + num_blocks].clone()

    def gather(self, layer: int, kind: int, blocks: torch.Tensor, slots: torch.Tensor,
               out: torch.Tensor, rope: Rope | None = None) -> int:
        offsets = self._offsets[layer, kind].to(out.device, non_blocking=True)
        gather(self.data.view(-1), offsets, blocks, slots, out, rope)
        return _count_bytes(slots, self.geometry)


class ArenaBlockSource:
    """Blocks read straight out of the daemon's mapped arena (raw KVC1 chunk objects).

    ``extents[c]`` is the leased extent of stored chunk ``c`` of the sequence (tokens
    ``c * chunk_tokens ..``), a raw-codec object in canonical order with pre-RoPE keys.
    It serves blocks ``0 .. num_blocks``; put a :class:`SplitBlockSource` in front for
    the blocks generated after them.
    """

    def __init__(self, reader: ArenaReader, extents: Sequence[Extent],
                 geometry: BlockGeometry) -> None:
        self.geometry = geometry
        size = os.path.getsize(reader.path)
        with warnings.catch_warnings():  # read-only mapping: we never write through it
            warnings.simplefilter("ignore", UserWarning)
            raw = np.frombuffer(reader.view(Extent(0, size)), dtype=np.uint8)
            self.base = torch.from_numpy(raw[: size // 2 * 2].view(np.uint16)).view(
                geometry.torch_dtype)
        self.num_blocks, self._offsets = self._block_offsets(reader, extents)

    def _block_offsets(self, reader: ArenaReader, extents: Sequence[Extent]
                       ) -> tuple[int, torch.Tensor]:
        g = self.geometry
        itemsize = DTYPE_ITEMSIZE[g.dtype]
        per_chunk: list[torch.Tensor] = []
        for index, extent in enumerate(extents):
            header, payload = raw_payload(reader.view(extent))
            want = (g.num_layers, g.num_kv_heads, g.head_dim, g.dtype)
            got = (header.num_layers, header.num_kv_heads, header.head_dim, header.dtype)
            if got != want or header.num_tokens % g.block_tokens:
                raise InvalidArgument(f"arena chunk {index} has layout {got}, "
                                      f"{header.num_tokens} tokens; decoder wants {want}")
            start = extent.offset + (extent.length - payload.nbytes)
            if start % itemsize:
                raise InvalidArgument(f"arena chunk {index} payload at byte {start} is unaligned")
            head_elems = header.num_tokens * g.head_dim  # one (layer, K|V, head) section part
            lkh = torch.arange(g.num_layers * 2 * g.num_kv_heads).view(g.num_layers, 2, -1, 1)
            blk = torch.arange(header.num_tokens // g.block_tokens) * g.block_tokens * g.head_dim
            per_chunk.append(start // itemsize + lkh * head_elems + blk)
        if not per_chunk:
            return 0, torch.zeros(g.num_layers, 2, g.num_kv_heads, 0, dtype=torch.int64)
        offsets = torch.cat(per_chunk, dim=-1)
        return offsets.shape[-1], offsets

    def gather(self, layer: int, kind: int, blocks: torch.Tensor, slots: torch.Tensor,
               out: torch.Tensor, rope: Rope | None = None) -> int:
        live = slots >= 0
        if bool((blocks[live] >= self.num_blocks).any()):
            raise InvalidArgument(f"block ids beyond the {self.num_blocks} blocks in the arena")
        offsets = self._offsets[layer, kind].to(out.device)
        gather(self.base, offsets, blocks, slots, out, rope)
        return _count_bytes(slots, self.geometry)


class SplitBlockSource:
    """Blocks below ``prefix_blocks`` from a shared read-only source, the rest from a
    private pool that sealing writes into (so a stored prefix is never overwritten)."""

    def __init__(self, prefix: BlockSource, prefix_blocks: int, tail: HostBlockPool) -> None:
        if tail.first_block != prefix_blocks or tail.geometry != prefix.geometry:
            raise InvalidArgument(f"tail pool starts at block {tail.first_block} with "
                                  f"{tail.geometry}; expected {prefix_blocks}, {prefix.geometry}")
        self.prefix, self.prefix_blocks, self.tail = prefix, prefix_blocks, tail
        self.geometry = prefix.geometry

    def write(self, layer: int, kind: int, first_block: int, blocks: torch.Tensor) -> None:
        self.tail.write(layer, kind, first_block, blocks)

    def gather(self, layer: int, kind: int, blocks: torch.Tensor, slots: torch.Tensor,
               out: torch.Tensor, rope: Rope | None = None) -> int:
        in_prefix = blocks < self.prefix_blocks
        prefix_slots = torch.where(in_prefix, slots, -1)
        fetched = 0
        if bool((prefix_slots >= 0).any()):
            fetched += self.prefix.gather(layer, kind, torch.where(in_prefix, blocks, 0),
                                          prefix_slots, out, rope)
        tail_slots = torch.where(in_prefix, -1, slots)
        if bool((tail_slots >= 0).any()):
            tail_blocks = torch.where(in_prefix, self.prefix_blocks, blocks)
            fetched += self.tail.gather(layer, kind, tail_blocks, tail_slots, out, rope)
        return fetched


class RemoteBlockSource:
    """The fallback: one batched FetchBlocks per (layer, K|V) and step, no arena mapping."""

    def __init__(self, fetcher: BlockFetcher, geometry: BlockGeometry) -> None:
        self.fetcher, self.geometry = fetcher, geometry
        self.num_calls = 0

    def gather(self, layer: int, kind: int, blocks: torch.Tensor, slots: torch.Tensor,
               out: torch.Tensor, rope: Rope | None = None) -> int:
        hs, idx = (slots >= 0).nonzero(as_tuple=True)
        if hs.numel() == 0:
            return 0
        g = self.geometry
        blk = blocks[hs, idx]
        data = self.fetcher.fetch_blocks(layer, kind, hs.tolist(), blk.tolist())
        self.num_calls += 1
        expected = hs.numel() * g.block_bytes
        if len(data) != expected:
            raise InvalidArgument(f"FetchBlocks returned {len(data)} bytes, expected {expected}")
        rows = torch.frombuffer(bytearray(data), dtype=g.torch_dtype)
        rows = rows.view(-1, g.block_tokens, g.head_dim).to(out.device)
        if rope is not None:
            pos = blk.cpu()[:, None] * g.block_tokens + torch.arange(g.block_tokens)
            rows = rotate(rows, pos.to(out.device), *rope)
        out[hs, slots[hs, idx]] = rows.to(out.dtype)
        return expected
