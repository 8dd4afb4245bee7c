"""Blobs larger than one gRPC message: stored as parts plus a manifest (``put_blob``).

A blob is one gRPC message, so ``put_blob`` stores a larger one (a long prompt's
sparse shadow bundle) as parts under their own kinds plus a manifest under the
plain kind that names their count, the total length and the whole blob's
XXH3-64; ``get_blob`` joins and verifies them. A blob of at most one part is
stored as itself (one round trip). The manifest is written last, after all of
its parts: a put that fails part way leaves the previous manifest beside a mix
of its parts and new ones, the mix fails the manifest's XXH3-64, and a read
returns a miss, never a blob made of two blobs.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import xxhash

from kvstore.errors import CapacityExhausted, Corrupt

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

    @classmethod
    def of(cls, data: bytes | memoryview, part_bytes: int) -> PartManifest:
        """The manifest of ``data`` stored in parts of ``part_bytes``."""
        return cls(len(data), part_bytes, -(-len(data) // part_bytes),
                   xxhash.xxh3_64_intdigest(data))

    def check_part(self, index: int, part: bytes) -> None:
        """Corrupt unless ``part`` has the length this manifest gives part ``index``."""
        if len(part) != self.part_length(index):
            raise Corrupt(f"part {index} of {self.num_parts} is {len(part)} bytes, the "
                          f"manifest wants {self.part_length(index)}")

    def check_whole(self, data: bytes) -> None:
        """Corrupt unless the joined parts hash to the whole blob's XXH3-64."""
        if xxhash.xxh3_64_intdigest(data) != self.blob_xxh3:
            raise Corrupt(f"its {self.num_parts} parts do not hash to the manifest's "
                          "XXH3-64 (parts of two different blobs?)")

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


def part_size(payload_bytes: int, num_tokens: int, max_part_bytes: int) -> int:
    """The largest blob stored whole, and the part size, for a blob of ``num_tokens``.

    ``payload_bytes`` is what one message may carry (the client's message limit
    less the envelope headroom).

    Raises:
        CapacityExhausted: the tokens leave less than 64 KiB per part.
    """
    size = min(max_part_bytes, payload_bytes - _TOKEN_BYTES * num_tokens)
    if size < _MIN_PART_BYTES:
        raise CapacityExhausted(
            f"{num_tokens} tokens leave {size} bytes per blob part under the client's "
            f"message limit, want at least {_MIN_PART_BYTES}; raise max_message_bytes")
    return size


# What makes a parted blob read as a miss: a bad manifest or part, or a part the
# daemon cannot send under this client's message limit.
BROKEN_ERRORS = (Corrupt, CapacityExhausted)


def is_manifest(head: bytes) -> bool:
    """Whether a stored blob is the manifest of a parted one (else the blob itself)."""
    return bytes(head[:4]) == PARTS_MAGIC
