"""Sequence stores: where a prefix's blocks and shadow bundle live between generations.

A stored sequence is found by (prefix tokens, kind); the kind names the model and
every setting that shapes a bundle (:func:`sequence_kind`), so a bundle is never
looked up for another model or another shadow configuration.

- :class:`HostSequenceStore` keeps both in this process (tests, CPU use).
- :class:`DaemonSequenceStore` keeps them in a kvstore daemon (DESIGN §6): the
  prefix's whole chunks as ordinary chunks of a namespace declared
  ``keys_pre_rope``, and the bundle as a blob beside them (``PutBlob``), so another
  process, or the same one after a restart, reloads the bundle instead of
  recomputing the SVD. Sealed blocks past the last whole chunk go in a second
  blob (a raw KVC1 object). Reads of the prefix use ``FetchBlocks``. A bundle
  larger than one message is stored in parts by the client's ``put_blob``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NewType, Protocol

import numpy as np
import torch

from kvstore.codec.raw import decode_raw, encode_raw
from kvstore.errors import CapacityExhausted, Corrupt, InvalidArgument
from kvstore.layout import KVLayout
from kvstore.sparse.blocks import (
    BlockGeometry,
    BlockSource,
    BlockStore,
    ClientBlockFetcher,
    HostBlockPool,
    RemoteBlockSource,
    SplitBlockSource,
)
from kvstore.sparse.config import SparseConfig
from kvstore.sparse.shadow import BUNDLE_VERSION, ShadowBundle

log = logging.getLogger(__name__)

SequenceKind = NewType("SequenceKind", str)  # "sparse-shadow-v1:<digest>", at most 128 bytes
_LOOSE_SUFFIX = "+blocks"  # kind of the blob holding sealed blocks past the last chunk


def sequence_kind(fingerprint: str, cfg: SparseConfig) -> SequenceKind:
    """The kind of a bundle: the model plus every setting that shapes its shadows."""
    digest = hashlib.sha256(fingerprint.encode())
    shape = (cfg.block_tokens, cfg.rank, cfg.sink_blocks, cfg.local_blocks,
             cfg.outlier_blocks, cfg.dense_layers, cfg.selector == "dense", cfg.store_dtype)
    digest.update(repr(shape).encode())
    return SequenceKind(f"sparse-shadow-v{BUNDLE_VERSION}:{digest.hexdigest()[:40]}")


@dataclass(frozen=True, slots=True)
class StoredSequence:
    bundle: bytes  # ShadowBundle.to_bytes()
    blocks: BlockSource  # the prefix blocks, read-only from here on


class SequenceStore(Protocol):
    """What ``generate`` needs from a store."""

    def lookup(self, prefix: Sequence[int], kind: SequenceKind,
               geometry: BlockGeometry) -> StoredSequence | None: ...

    def create(self, prefix: Sequence[int], kind: SequenceKind, geometry: BlockGeometry,
               capacity_blocks: int) -> BlockStore: ...

    def save_bundle(self, prefix: Sequence[int], kind: SequenceKind,
                    bundle: ShadowBundle) -> None: ...


class HostSequenceStore:
    """In-process store: one :class:`HostBlockPool` and one bundle per (kind, prefix)."""

    def __init__(self) -> None:
        self._pools: dict[tuple[str, tuple[int, ...]], HostBlockPool] = {}
        self._bundles: dict[tuple[str, tuple[int, ...]], bytes] = {}

    def lookup(self, prefix: Sequence[int], kind: SequenceKind,
               geometry: BlockGeometry) -> StoredSequence | None:
        key = (kind, tuple(prefix))
        if key not in self._bundles:
            return None
        return StoredSequence(self._bundles[key], self._pools[key])

    def create(self, prefix: Sequence[int], kind: SequenceKind, geometry: BlockGeometry,
               capacity_blocks: int) -> HostBlockPool:
        key = (kind, tuple(prefix))
        self._pools[key] = pool = HostBlockPool(geometry, capacity_blocks)
        self._bundles.pop(key, None)  # a bundle is valid only for the blocks beside it
        return pool

    def save_bundle(self, prefix: Sequence[int], kind: SequenceKind,
                    bundle: ShadowBundle) -> None:
        self._bundles[(kind, tuple(prefix))] = bundle.to_bytes()

    def __len__(self) -> int:
        return len(self._bundles)


class DaemonSequenceStore:
    """Blocks and bundles in a kvstore daemon (see module doc).

    Args:
        client: a ``kvstore.client.Client`` whose layout has ``keys_pre_rope=True``
            and matches the model (layers, kv heads, head dim; its dtype is the block
            store's dtype, ``SparseConfig.store_dtype``).
    """

    def __init__(self, client: Any) -> None:
        layout: KVLayout = client.layout
        if not layout.keys_pre_rope:
            raise InvalidArgument("sparse decode stores pre-RoPE keys: open the client with "
                                  "KVLayout(..., keys_pre_rope=True) and a namespace of its own")
        self.client, self.layout = client, layout
        self._pending: dict[tuple[str, tuple[int, ...]], HostBlockPool] = {}
        self.num_loaded = 0  # lookups that found a bundle with its blocks
        self.num_saved = 0  # bundles written

    def _check(self, geometry: BlockGeometry) -> None:
        lay = self.layout
        want = (lay.num_layers, lay.num_kv_heads, lay.head_dim, lay.dtype)
        got = (geometry.num_layers, geometry.num_kv_heads, geometry.head_dim, geometry.dtype)
        if got != want or lay.chunk_tokens % geometry.block_tokens:
            raise InvalidArgument(
                f"the decoder's blocks (layers, kv heads, head dim, dtype) = {got} of "
                f"{geometry.block_tokens} tokens do not fit namespace layout {want} with "
                f"{lay.chunk_tokens}-token chunks (set store_dtype to the layout dtype)")

    def _get_blob(self, prefix: Sequence[int], kind: str) -> bytes | None:
        """A stored blob, or None: one the daemon cannot hand over is a miss, not an error."""
        try:
            return self.client.get_blob(prefix, kind)
        except (Corrupt, CapacityExhausted) as exc:
            log.warning("ignoring blob %s of %d tokens: %s", kind, len(prefix), exc)
            return None

    def _num_chunk_blocks(self, prefix: Sequence[int], geometry: BlockGeometry) -> int:
        """Sealed blocks held by the prefix's whole chunks."""
        whole = len(prefix) // self.layout.chunk_tokens * self.layout.chunk_tokens
        return whole // geometry.block_tokens

    def lookup(self, prefix: Sequence[int], kind: SequenceKind,
               geometry: BlockGeometry) -> StoredSequence | None:
        self._check(geometry)
        bundle = self._get_blob(prefix, kind)
        if bundle is None:
            return None
        in_chunks = self._num_chunk_blocks(prefix, geometry)
        if self.client.lookup(prefix) < in_chunks * geometry.block_tokens:
            log.info("shadow bundle found but the prefix chunks are gone; rebuilding")
            return None
        blocks: BlockSource = RemoteBlockSource(
            ClientBlockFetcher(self.client, prefix, geometry.block_tokens), geometry)
        num_loose = len(prefix) // geometry.block_tokens - in_chunks
        if num_loose:
            loose = self._load_loose(prefix, kind, geometry, in_chunks, num_loose)
            if loose is None:
                return None
            blocks = SplitBlockSource(blocks, in_chunks, loose)
        self.num_loaded += 1
        return StoredSequence(bundle, blocks)

    def _load_loose(self, prefix: Sequence[int], kind: str, geometry: BlockGeometry,
                    first: int, count: int) -> HostBlockPool | None:
        obj = self._get_blob(prefix, kind + _LOOSE_SUFFIX)
        if obj is None:
            return None
        g = geometry
        try:
            header, kv = decode_raw(obj)  # [L, 2, Hkv, count * T, D]
        except (Corrupt, InvalidArgument) as exc:
            log.warning("ignoring a bad loose-block blob: %s", exc)
            return None
        if kv.shape != (g.num_layers, 2, g.num_kv_heads, count * g.block_tokens, g.head_dim) \
                or header.dtype != g.dtype:
            log.warning("ignoring a loose-block blob of shape %s %s", kv.shape, header.dtype)
            return None
        data = torch.from_numpy(kv.copy())
        if g.dtype == "bfloat16":
            data = data.view(torch.bfloat16)
        pool = HostBlockPool(g, count, first_block=first)
        for layer in range(g.num_layers):
            for kind_index in range(2):
                pool.write(layer, kind_index, first, data[layer, kind_index].reshape(
                    g.num_kv_heads, count, g.block_tokens, g.head_dim))
        return pool

    def create(self, prefix: Sequence[int], kind: SequenceKind, geometry: BlockGeometry,
               capacity_blocks: int) -> HostBlockPool:
        self._check(geometry)
        pool = HostBlockPool(geometry, capacity_blocks)
        self._pending[(kind, tuple(prefix))] = pool
        return pool

    def save_bundle(self, prefix: Sequence[int], kind: SequenceKind,
                    bundle: ShadowBundle) -> None:
        """Put the prefix's whole chunks, the loose blocks, then the bundle.

        Blobs larger than a message go in parts (``Client.put_blob``). A put the
        daemon refuses (no tier holds it, or its message limit is below the client's)
        is logged and the bundle not saved: the next generation recomputes it (a miss,
        not an error).
        """
        pool = self._pending.pop((kind, tuple(prefix)))
        g = pool.geometry
        in_chunks = self._num_chunk_blocks(prefix, g)
        kv = pool.data[:, :, :, : bundle.num_blocks]  # [L, 2, Hkv, NB, T, D]
        kv = kv.reshape(g.num_layers, 2, g.num_kv_heads, -1, g.head_dim)
        split = in_chunks * g.block_tokens
        try:
            if split:
                self.client.put(list(prefix[:split]), kv[:, :, :, :split].contiguous())
            if bundle.num_blocks > in_chunks:
                loose = _storage(kv[:, :, :, split:])
                layout = KVLayout(g.num_layers, g.num_kv_heads, g.head_dim, g.dtype,
                                  loose.shape[3])
                self.client.put_blob(prefix, kind + _LOOSE_SUFFIX, encode_raw(loose, layout))
            self.client.put_blob(prefix, kind, bundle.to_bytes())
        except CapacityExhausted as exc:
            log.warning("shadow bundle of %d tokens not saved: %s", len(prefix), exc)
            return
        self.num_saved += 1


def _storage(kv: torch.Tensor) -> np.ndarray:
    """A contiguous numpy copy in storage dtype (bfloat16 as its uint16 bits)."""
    kv = kv.contiguous()
    if kv.dtype == torch.bfloat16:
        return kv.view(torch.int16).numpy().view(np.uint16)
    return kv.numpy()
