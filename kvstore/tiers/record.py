"""The key record: which chunk a stored object is, kept beside it on the disk and in Redis.

A KVC1 object proves its bytes are whole (checksum) but not *which* chunk they
are: a valid object file copied over another chunk's file, or a Redis value
copied to another key, would be served as that other chunk. So every object a
tier writes to a medium carries this 64-byte record, and a read whose record names
another key (or another object) is a corrupt miss, never data.

The chunk key is the full 32-byte key the engine asked for; it already hashes the
namespace id, and the namespace id hashes the tenant (docs/design.md §2), so one
key comparison checks chunk, namespace and tenant at once. Byte layout (all
little-endian)::

    offset size field
    0      4    magic           b"KVK1"
    4      2    version         RECORD_VERSION (1)
    6      2    reserved        0
    8      32   chunk_key       the ChunkKey the object is stored under
    40     8    object_checksum the KVC1 header's checksum field (binds record and object)
    48     8    object_bytes    length of the KVC1 object
    56     8    checksum        XXH3-64 of bytes 0-55

Where it lives: the disk tier appends it to the object in the same file (a trailer,
so the object starts at offset 0 and a GPUDirect read of it stays page-aligned);
the Redis tier stores it as field ``k`` of a hash whose field ``o`` is the object
(one HMGET returns both, no copy of the object to split them). DRAM objects carry
no record: the arena's index lives in the daemon's memory, not on a medium another
process can rearrange, and same-host clients read the arena's bytes as KVC1 objects.
"""

from __future__ import annotations

import struct

import xxhash

from kvstore.errors import Corrupt
from kvstore.keys import ChunkKey

RECORD_MAGIC = b"KVK1"
RECORD_VERSION = 1
_RECORD = struct.Struct("<4sHH32sQQQ")
RECORD_BYTES = 64
assert _RECORD.size == RECORD_BYTES
_CHECKED = 56  # bytes covered by the record checksum
_OBJECT_CHECKSUM_AT = 40  # offset of the checksum field in a KVC1 header (codec/format.py)
_OBJECT_CHECKSUM = struct.Struct("<Q")


def _object_checksum(obj: bytes | memoryview) -> int:
    if len(obj) < _OBJECT_CHECKSUM_AT + 8:
        return 0  # not a KVC1 object: verifying the object itself fails after the record
    return _OBJECT_CHECKSUM.unpack_from(obj, _OBJECT_CHECKSUM_AT)[0]


def pack_record(key: ChunkKey, obj: bytes | memoryview) -> bytes:
    """The 64-byte record naming ``key`` as the chunk ``obj`` (a KVC1 object) is."""
    body = _RECORD.pack(RECORD_MAGIC, RECORD_VERSION, 0, key, _object_checksum(obj), len(obj),
                        0)[:_CHECKED]
    return body + struct.pack("<Q", xxhash.xxh3_64_intdigest(body))


def check_record(record: bytes | memoryview, key: ChunkKey, obj: bytes | memoryview) -> None:
    """Check that ``record`` is sound and names ``key`` and ``obj``.

    Raises:
        Corrupt: no record or a damaged one (an object written before records
            existed reads as this too), a record of another chunk (a moved or copied
            file or value), or one of another object.
    """
    if len(record) != RECORD_BYTES:
        raise Corrupt(f"key record is {len(record)} bytes, expected {RECORD_BYTES} "
                      "(an object stored without one, or truncated)")
    magic, version, reserved, named, obj_checksum, obj_bytes, checksum = _RECORD.unpack(record)
    if magic != RECORD_MAGIC or version != RECORD_VERSION or reserved:
        raise Corrupt(f"no key record (magic {bytes(magic)!r}, version {version}): stored "
                      "without one, or damaged")
    if checksum != xxhash.xxh3_64_intdigest(memoryview(record)[:_CHECKED]):
        raise Corrupt("key record fails its checksum")
    if named != key:
        raise Corrupt(f"object is chunk {bytes(named).hex()[:16]}…, stored under "
                      f"{key.hex()[:16]}… (moved or copied from another chunk)")
    if obj_bytes != len(obj) or obj_checksum != _object_checksum(obj):
        raise Corrupt(f"key record names a {obj_bytes}-byte object with checksum "
                      f"{obj_checksum:#018x}, found {len(obj)} bytes (another object)")
