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
  blob (a raw KVC1 object). Reads of the prefix use ``FetchBlocks``.

A blob is one gRPC message, so :class:`PartedBlobs` stores a larger one (a long
prompt's bundle) as parts under their own kinds plus a manifest under the plain
kind that names their count, the total length and the whole blob's XXH3-64; a
blob of at most one part (8 MiB) is stored as itself (one round trip).
"""

from __future__ import annotations

import hashlib
import logging
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NewType, Protocol

import numpy as np
import torch
import xxhash

from kvstore.client._protocol import PART_HEADROOM_BYTES
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
        self.blobs = PartedBlobs(client)  # bundles and loose blocks, in parts when large
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

    def _num_chunk_blocks(self, prefix: Sequence[int], geometry: BlockGeometry) -> int:
        """Sealed blocks held by the prefix's whole chunks."""
        whole = len(prefix) // self.layout.chunk_tokens * self.layout.chunk_tokens
        return whole // geometry.block_tokens

    def lookup(self, prefix: Sequence[int], kind: SequenceKind,
               geometry: BlockGeometry) -> StoredSequence | None:
        self._check(geometry)
        bundle = self.blobs.get(prefix, kind)
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
        obj = self.blobs.get(prefix, kind + _LOOSE_SUFFIX)
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

        Blobs larger than a message go in parts (:class:`PartedBlobs`). A put the
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
                self.blobs.put(prefix, kind + _LOOSE_SUFFIX, encode_raw(loose, layout))
            self.blobs.put(prefix, kind, bundle.to_bytes())
        except CapacityExhausted as exc:
            log.warning("shadow bundle of %d tokens not saved: %s", len(prefix), exc)
            return
        self.num_saved += 1



# ------------------------------------------------------------ blobs larger than a message

# Manifest of a blob stored in parts, itself stored under the blob's plain kind
# (little-endian); part i of n (i from 0) is stored under part_kind(kind, i, n).
#
#     offset size field
#     0      4    magic        b"KVBP"
#     4      2    version      PARTS_VERSION
#     6      2    reserved     0
#     8      8    total_bytes  length of the whole blob
#     16     8    part_bytes   length of every part but the last, which holds the rest
#     24     8    num_parts    n >= 2 (a blob that fits one message is stored whole)
#     32     8    blob_xxh3    XXH3-64 of the whole blob
#     40     8    checksum     XXH3-64 of bytes 0-39
PARTS_MAGIC = b"KVBP"  # neither a bundle (b"KVSB") nor a KVC1 object starts with it
PARTS_VERSION = 1
_MANIFEST_BODY = struct.Struct("<4sHHQQQQ")
MANIFEST_BYTES = 48
assert _MANIFEST_BODY.size + 8 == MANIFEST_BYTES
_TOKEN_BYTES = 4  # a PutBlob request carries its tokens as int32 beside the data
_MIN_PART_BYTES = 64 << 10  # below this, parts would be mostly envelope
# Parts stay this small under a larger message limit: on loopback 4-8 MiB parts move a
# 24-576 MB blob fastest, 64 MiB ones take 1.3-2.4x as long (bench_blob_parts.py).
MAX_PART_BYTES = 8 << 20


def part_kind(kind: str, index: int, num_parts: int) -> str:
    """The kind of part ``index`` (from 0) of a blob stored in ``num_parts`` parts."""
    return f"{kind}/part-{index}-of-{num_parts}"


@dataclass(frozen=True, slots=True)
class PartManifest:
    """What a reader needs to fetch and verify the parts of one blob (layout above)."""

    total_bytes: int  # length of the whole blob
    part_bytes: int  # length of every part but the last
    num_parts: int  # parts stored, >= 2
    blob_xxh3: int  # XXH3-64 of the whole blob: a mix of two blobs' parts fails it

    def __post_init__(self) -> None:
        if self.part_bytes < 1 or self.num_parts < 2 \
                or self.num_parts != -(-self.total_bytes // self.part_bytes):
            raise Corrupt(f"blob manifest names {self.num_parts} parts of {self.part_bytes} "
                          f"bytes for a {self.total_bytes}-byte blob")

    def part_length(self, index: int) -> int:
        return min(self.part_bytes, self.total_bytes - index * self.part_bytes)

    def to_bytes(self) -> bytes:
        body = _MANIFEST_BODY.pack(PARTS_MAGIC, PARTS_VERSION, 0, self.total_bytes,
                                   self.part_bytes, self.num_parts, self.blob_xxh3)
        return body + struct.pack("<Q", xxhash.xxh3_64_intdigest(body))

    @classmethod
    def from_bytes(cls, data: bytes) -> PartManifest:
        """Parse and verify a manifest; Corrupt on a bad length, header or checksum."""
        if len(data) != MANIFEST_BYTES:
            raise Corrupt(f"blob manifest is {len(data)} bytes, expected {MANIFEST_BYTES}")
        body = data[: _MANIFEST_BODY.size]
        magic, version, _, total, part, num, blob_xxh3 = _MANIFEST_BODY.unpack(body)
        (checksum,) = struct.unpack_from("<Q", data, _MANIFEST_BODY.size)
        if (magic, version) != (PARTS_MAGIC, PARTS_VERSION):
            raise Corrupt(f"blob manifest has magic {magic!r} v{version}, "
                          f"expected {PARTS_MAGIC!r} v{PARTS_VERSION}")
        if checksum != xxhash.xxh3_64_intdigest(body):
            raise Corrupt("blob manifest fails its checksum")
        return cls(total, part, num, blob_xxh3)


class PartedBlobs:
    """Blobs of any size over a client's ``put_blob``/``get_blob`` (one message each).

    A blob of at most one part is stored whole under its kind: one round trip. A
    larger one is stored as parts under :func:`part_kind` kinds, then a
    :class:`PartManifest` under the plain kind, last, so a manifest is only ever
    written after all of its parts. A put that fails part way leaves the previous
    manifest beside a mix of its parts and new ones: the mix fails the manifest's
    XXH3-64, and a read then returns a miss, never a blob made of two blobs.

    Args:
        client: a ``kvstore.client.Client``; parts fit its message limit.
        max_part_bytes: the largest blob stored whole, and the size of parts.
    """

    def __init__(self, client: Any, max_part_bytes: int = MAX_PART_BYTES) -> None:
        self.client, self.max_part_bytes = client, max_part_bytes
        # What the client sends per message: its max_message_bytes less the envelope
        # headroom its own Put parts leave.
        self._payload_bytes: int = client.max_message_bytes - PART_HEADROOM_BYTES
        self.num_broken = 0  # parted blobs read with a part missing or not matching

    def part_bytes(self, tokens: Sequence[int]) -> int:
        """The largest blob stored whole, and the part size, for a blob of ``tokens``."""
        size = min(self.max_part_bytes, self._payload_bytes - _TOKEN_BYTES * len(tokens))
        if size < _MIN_PART_BYTES:
            raise CapacityExhausted(
                f"{len(tokens)} tokens leave {size} bytes per blob part under the client's "
                f"message limit, want at least {_MIN_PART_BYTES}; raise max_message_bytes")
        return size

    def put(self, tokens: Sequence[int], kind: str, data: bytes) -> int:
        """Store ``data`` under ``kind``; returns the blobs written (1, or parts + 1).

        Raises:
            CapacityExhausted: the daemon refused a part (its message limit is below the
                client's, or no tier holds it); what is stored then reads as a miss or
                as the previous blob.
        """
        size = self.part_bytes(tokens)
        if len(data) <= size:
            self.client.put_blob(tokens, kind, data)
            return 1
        num_parts = -(-len(data) // size)
        manifest = PartManifest(len(data), size, num_parts, xxhash.xxh3_64_intdigest(data))
        view = memoryview(data)
        for i in range(num_parts):
            self.client.put_blob(tokens, part_kind(kind, i, num_parts),
                                 view[i * size : (i + 1) * size])
        self.client.put_blob(tokens, kind, manifest.to_bytes())
        return num_parts + 1

    def get(self, tokens: Sequence[int], kind: str) -> bytes | None:
        """The blob under ``kind``, reassembled and verified; None on a miss.

        A missing part, a part of the wrong length, a manifest that does not parse and
        parts that do not hash to the manifest's XXH3-64 are all misses (logged).
        """
        try:
            head = self.client.get_blob(tokens, kind)
            if head is None or not head.startswith(PARTS_MAGIC):
                return head
            return self._join(tokens, kind, PartManifest.from_bytes(head))
        except (Corrupt, CapacityExhausted) as exc:
            self.num_broken += 1
            log.warning("ignoring blob %s of %d tokens: %s", kind, len(tokens), exc)
            return None

    def _join(self, tokens: Sequence[int], kind: str, manifest: PartManifest) -> bytes | None:
        parts = []
        for i in range(manifest.num_parts):
            part = self.client.get_blob(tokens, part_kind(kind, i, manifest.num_parts))
            if part is None:
                self.num_broken += 1
                log.info("blob %s of %d tokens lost part %d of %d; a miss",
                         kind, len(tokens), i, manifest.num_parts)
                return None
            if len(part) != manifest.part_length(i):
                raise Corrupt(f"part {i} of {manifest.num_parts} is {len(part)} bytes, the "
                              f"manifest wants {manifest.part_length(i)}")
            parts.append(part)
        data = b"".join(parts)
        if xxhash.xxh3_64_intdigest(data) != manifest.blob_xxh3:
            raise Corrupt(f"its {manifest.num_parts} parts do not hash to the manifest's "
                          "XXH3-64 (parts of two different blobs?)")
        return data


def _storage(kv: torch.Tensor) -> np.ndarray:
    """A contiguous numpy copy in storage dtype (bfloat16 as its uint16 bits)."""
    kv = kv.contiguous()
    if kv.dtype == torch.bfloat16:
        return kv.view(torch.int16).numpy().view(np.uint16)
    return kv.numpy()
