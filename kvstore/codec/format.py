"""The KVC1 stored-object format: a fixed header, a section table, codec metadata, sections.

Every stored chunk is one object. Byte layout (all little-endian):

    offset size field
    0      4    magic            b"KVC1"
    4      2    format_version   FORMAT_VERSION (2; 1 used xxh64 as the checksum)
    6      1    codec_id         CodecId (0 raw, 1 kvq, 2 blob)
    7      1    codec_level      codec-specific level (0 for raw)
    8      1    dtype_code       DTYPE_CODES (1 float16, 2 bfloat16, 3 float32)
    9      1    flags            bit 0: position-free chunk (RAG); others 0
    10     2    num_layers
    12     2    num_kv_heads
    14     2    head_dim
    16     4    num_tokens       tokens in this object
    20     4    num_sections     entries in the section table (2 * num_layers for a chunk)
    24     4    meta_bytes       codec metadata bytes after the section table
    28     4    reserved         0
    32     8    payload_bytes    bytes after the header (table + meta + sections)
    40     8    checksum         XXH3-64 of header[0:40] followed by the payload
    48          -- payload --
    48     4*S  section table    u32 byte length of each section, in order
    ...    M    meta             codec metadata (M = meta_bytes)
    ...         sections         concatenated; chunk objects order them (layer, K|V)

The checksum covers the header fields too, so a flipped bit anywhere is caught.
This module needs only struct, numpy and xxhash: the client imports it to build
and verify objects end to end without pulling in the codecs.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import xxhash

from kvstore.errors import Corrupt, InvalidArgument
from kvstore.layout import KVLayout

MAGIC = b"KVC1"
FORMAT_VERSION = 2
# The checksum is XXH3's 64-bit variant (xxHash family; DESIGN §3 allows xxhash64 or
# CRC32C): over a 5.9 MB object it hashes 56-64 GB/s here against xxh64's 10-11
# (bench/bench_micro.py, in cache), and every
# object is hashed at least three times on its way (client, daemon put, tier read).
_hasher = xxhash.xxh3_64
_HEADER = struct.Struct("<4sHBBBBHHHIIIIQQ")
HEADER_BYTES = 48
assert _HEADER.size == HEADER_BYTES
_CHECKED_PREFIX = 40  # header bytes covered by the checksum (everything before it)

DTYPE_CODES: dict[str, int] = {"float16": 1, "bfloat16": 2, "float32": 3}
DTYPE_NAMES: dict[int, str] = {v: k for k, v in DTYPE_CODES.items()}
FLAG_POSITION_FREE = 1
_KNOWN_FLAGS = FLAG_POSITION_FREE
# Sanity bound on an object's payload: refuse to allocate for forged lengths.
MAX_OBJECT_BYTES = 1 << 32


class CodecId(enum.IntEnum):
    RAW = 0
    KVQ = 1
    # Not a chunk: opaque bytes attached to a sequence (kvstore/server/blobs.py), one
    # section; never accepted by Put nor served by Get.
    BLOB = 2


@dataclass(frozen=True, slots=True)
class ObjectHeader:
    codec_id: int
    codec_level: int
    dtype: str  # canonical dtype name of the decoded tensor
    flags: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_tokens: int
    num_sections: int
    meta_bytes: int
    payload_bytes: int
    checksum: int

    def layout(self, chunk_tokens: int | None = None) -> KVLayout:
        """The layout this object was written with (chunk size defaults to its token count)."""
        return KVLayout(
            num_layers=self.num_layers,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            dtype=self.dtype,
            chunk_tokens=chunk_tokens or self.num_tokens,
        )


@dataclass(frozen=True, slots=True)
class ParsedObject:
    header: ObjectHeader
    meta: memoryview  # codec metadata
    sections: list[memoryview]  # views into the object bytes, in table order


def pack_object(
    *,
    codec_id: int,
    codec_level: int,
    dtype: str,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    num_tokens: int,
    sections: Sequence[bytes | memoryview],
    meta: bytes = b"",
    flags: int = 0,
) -> bytes:
    """Assemble one object: header, section table, meta, then the sections."""
    sizes = (memoryview(s).nbytes for s in sections)
    lengths = np.fromiter(sizes, dtype="<u4", count=len(sections))
    table = lengths.tobytes()
    payload_bytes = len(table) + len(meta) + int(lengths.sum(dtype=np.uint64))
    prefix = pack_header_prefix(
        codec_id=codec_id, codec_level=codec_level, dtype=dtype, flags=flags,
        num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim,
        num_tokens=num_tokens, num_sections=len(sections), meta_bytes=len(meta),
        payload_bytes=payload_bytes)
    h = _hasher(prefix)
    h.update(table)
    h.update(meta)
    for s in sections:
        h.update(s)
    checksum = struct.pack("<Q", h.intdigest())
    return b"".join([prefix, checksum, table, meta, *sections])


def pack_header_prefix(*, codec_id: int, codec_level: int, dtype: str, flags: int,
                       num_layers: int, num_kv_heads: int, head_dim: int, num_tokens: int,
                       num_sections: int, meta_bytes: int, payload_bytes: int) -> bytes:
    """The first 40 header bytes (everything but the checksum, which follows them).

    For writers that build an object in place (the same-host put writes it straight
    into the daemon's arena) and hash it as they go.
    """
    if dtype not in DTYPE_CODES:
        raise InvalidArgument(f"dtype must be one of {sorted(DTYPE_CODES)}, got {dtype!r}")
    if payload_bytes >= MAX_OBJECT_BYTES:
        raise InvalidArgument(f"object payload of {payload_bytes} bytes exceeds {MAX_OBJECT_BYTES}")
    return _HEADER.pack(
        MAGIC, FORMAT_VERSION, codec_id, codec_level, DTYPE_CODES[dtype], flags,
        num_layers, num_kv_heads, head_dim, num_tokens, num_sections, meta_bytes, 0,
        payload_bytes, 0,
    )[:_CHECKED_PREFIX]


def read_header(data: bytes | memoryview, object_bytes: int | None = None) -> ObjectHeader:
    """Parse and range-check the header; raises Corrupt. Does not verify the checksum.

    ``object_bytes``: the whole object's size when ``data`` is only its first bytes
    (a client that copied the header of an object held in device memory).
    """
    view = memoryview(data)
    total_bytes = view.nbytes if object_bytes is None else object_bytes
    if view.nbytes < HEADER_BYTES:
        raise Corrupt(f"object is {view.nbytes} bytes, shorter than the {HEADER_BYTES}-byte header")
    (magic, version, codec_id, level, dtype_code, flags, layers, heads, dim, tokens,
     num_sections, meta_bytes, reserved, payload_bytes, checksum) = _HEADER.unpack_from(view)
    if magic != MAGIC:
        raise Corrupt(f"bad magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise Corrupt(f"format version {version}, this build reads {FORMAT_VERSION}")
    if dtype_code not in DTYPE_NAMES:
        raise Corrupt(f"unknown dtype code {dtype_code}")
    if flags & ~_KNOWN_FLAGS or reserved:
        raise Corrupt(f"unknown flags {flags:#x} or reserved field {reserved:#x} set")
    if codec_id not in CodecId.__members__.values():
        raise Corrupt(f"unknown codec id {codec_id}")
    if min(layers, heads, dim, tokens) == 0:
        raise Corrupt(f"empty layout in header: layers={layers} heads={heads} dim={dim} "
                      f"tokens={tokens}")
    if total_bytes != HEADER_BYTES + payload_bytes:
        raise Corrupt(f"object is {total_bytes} bytes, header says {HEADER_BYTES + payload_bytes}")
    if 4 * num_sections + meta_bytes > payload_bytes:
        raise Corrupt(f"section table ({num_sections} entries) and meta ({meta_bytes} bytes) "
                      f"exceed the payload of {payload_bytes} bytes")
    return ObjectHeader(codec_id, level, DTYPE_NAMES[dtype_code], flags, layers, heads, dim,
                        tokens, num_sections, meta_bytes, payload_bytes, checksum)


def new_object_hasher(prefix: bytes | memoryview) -> Any:
    """The incremental hasher of object checksums, fed with ``header[0:40]`` first."""
    return _hasher(prefix)


def compute_checksum(data: bytes | memoryview) -> int:
    view = memoryview(data)
    h = _hasher(view[:_CHECKED_PREFIX])
    h.update(view[HEADER_BYTES:])
    return h.intdigest()


def verify_object(data: bytes | memoryview) -> ObjectHeader:
    """Check header, length and checksum; raises Corrupt on any mismatch."""
    header = read_header(data)
    actual = compute_checksum(data)
    if actual != header.checksum:
        raise Corrupt(f"checksum mismatch: stored {header.checksum:#018x}, computed {actual:#018x}")
    return header


def parse_object(data: bytes | memoryview, *, verify: bool = True) -> ParsedObject:
    """Split an object into header, meta and section views (no copies)."""
    header = verify_object(data) if verify else read_header(data)
    view = memoryview(data)
    table_end = HEADER_BYTES + 4 * header.num_sections
    lengths = np.frombuffer(view[HEADER_BYTES:table_end], dtype="<u4").astype(np.int64)
    meta_end = table_end + header.meta_bytes
    if int(lengths.sum()) != header.payload_bytes - 4 * header.num_sections - header.meta_bytes:
        raise Corrupt("section lengths do not add up to the payload length")
    sections: list[memoryview] = []
    offset = meta_end
    for n in lengths.tolist():
        sections.append(view[offset : offset + n])
        offset += n
    return ParsedObject(header, view[table_end:meta_end], sections)
