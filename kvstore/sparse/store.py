"""Sequence stores: where a sequence's blocks and shadow bundle live between generations.

:class:`HostSequenceStore` keeps them in this process (tests, CPU use, the shape a
daemon-backed store takes: blocks addressable per (layer, kv head, block) plus a
bundle persisted beside them, both found by a sequence key).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import NewType, Protocol

from kvstore.sparse.blocks import BlockGeometry, BlockSource, BlockStore, HostBlockPool
from kvstore.sparse.config import SparseConfig

SequenceKey = NewType("SequenceKey", bytes)  # 32-byte digest naming one stored prefix


def sequence_key(fingerprint: str, cfg: SparseConfig, tokens: list[int]) -> SequenceKey:
    """Key of a prefix's stored blocks + bundle: model, shadow-shaping config, tokens."""
    digest = hashlib.sha256(b"kvstore-sparse-v1\0" + fingerprint.encode())
    shape = (cfg.block_tokens, cfg.rank, cfg.sink_blocks, cfg.local_blocks,
             cfg.outlier_blocks, cfg.dense_layers, cfg.selector == "dense", cfg.store_dtype)
    digest.update(repr(shape).encode())
    digest.update(b"".join(int(t).to_bytes(4, "little", signed=True) for t in tokens))
    return SequenceKey(digest.digest())


@dataclass(frozen=True, slots=True)
class StoredSequence:
    bundle: bytes  # ShadowBundle.to_bytes()
    blocks: BlockSource  # the prefix blocks, read-only from here on


class SequenceStore(Protocol):
    """What ``generate`` needs from a store (in process today; the daemon later)."""

    def lookup(self, key: SequenceKey) -> StoredSequence | None: ...

    def create(self, key: SequenceKey, geometry: BlockGeometry,
               capacity_blocks: int) -> BlockStore: ...

    def save_bundle(self, key: SequenceKey, bundle: bytes) -> None: ...


class HostSequenceStore:
    """In-process store: one :class:`HostBlockPool` and one bundle per sequence key."""

    def __init__(self) -> None:
        self._pools: dict[SequenceKey, HostBlockPool] = {}
        self._bundles: dict[SequenceKey, bytes] = {}

    def lookup(self, key: SequenceKey) -> StoredSequence | None:
        if key not in self._bundles:
            return None
        return StoredSequence(self._bundles[key], self._pools[key])

    def create(self, key: SequenceKey, geometry: BlockGeometry,
               capacity_blocks: int) -> HostBlockPool:
        pool = HostBlockPool(geometry, capacity_blocks)
        self._pools[key] = pool
        self._bundles.pop(key, None)  # a bundle is valid only for the blocks beside it
        return pool

    def save_bundle(self, key: SequenceKey, bundle: bytes) -> None:
        self._bundles[key] = bundle

    def __len__(self) -> int:
        return len(self._bundles)
