"""Hand-framed protobuf bytes for the bulk messages: Get's data, Put's parts, FetchBlocks' data.

protobuf's Python runtime (upb) serialises a message holding a large ``bytes``
field slowly: measured here, ``GetResponse.SerializeToString`` of one 196 KiB
layer takes 280–330 µs (0.6–0.7 GB/s) while framing it by hand takes 7–8 µs
(`python bench/bench_micro.py`, row "frame").
At the streamed path's message rate that was most of the daemon's time per
message, so these two messages are framed by hand: the small fields go through
protobuf as usual and the payload is appended as one length-delimited field.
Protobuf parsers merge fields in any order, so the bytes parse to exactly the
message protobuf would have built (``tests/test_frames.py`` checks equality).

Both ends register :func:`serialize` as the serializer of these RPCs: it passes
framed bytes through and serialises anything else with protobuf.

The client parses GetResponse by hand too (:func:`parse_get_response`): upb copies
the received message into its own storage and copies ``data`` again on access
(together 0.3 ms per 5.9 MB object, ``bench/bench_micro.py`` row "parse"); the
hand parser returns ``data`` as a view of the received bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvstore._proto import kvstore_pb2 as pb
from kvstore._proto import kvstore_pb2_grpc as pb_grpc
from kvstore.errors import Corrupt

# Tags (field number << 3 | wire type 2 = length-delimited) of the framed fields.
_GET_RESPONSE_DATA = b"\x1a"  # GetResponse.data = 3
_PUT_REQUEST_CHUNK = b"\x12"  # PutRequest.chunk = 2
_PUT_CHUNK_OBJECT_PART = b"\x12"  # PutChunk.object_part = 2
_FETCH_BLOCKS_DATA = b"\x0a"  # FetchBlocksResponse.data = 1


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def get_response(*, chunk_index: int, data: Any, num_chunks: int, layer: int | None = None,
                 checksum_xxh3: int = 0, num_chunks_in_data: int = 0) -> bytes:
    """A serialised ``GetResponse`` carrying ``data``: a bytes-like object, or a list of
    them sent back to back (joined once, here)."""
    parts = data if isinstance(data, list) else [data]
    head = pb.GetResponse(chunk_index=chunk_index, layer=layer, checksum_xxh3=checksum_xxh3,
                          num_chunks=num_chunks,
                          num_chunks_in_data=num_chunks_in_data).SerializeToString()
    size = sum(len(part) for part in parts)
    return b"".join((head, _GET_RESPONSE_DATA, _varint(size), *parts))


def fetch_blocks_response(*, data: Any, block_bytes: int) -> bytes:
    """A serialised ``FetchBlocksResponse`` carrying ``data``."""
    head = pb.FetchBlocksResponse(block_bytes=block_bytes).SerializeToString()
    return b"".join((head, _FETCH_BLOCKS_DATA, _varint(len(data)), data))


def put_chunk_request(*, chunk_index: int, object_part: Any, last_part: bool) -> bytes:
    """A serialised ``PutRequest`` whose ``chunk`` carries ``object_part``."""
    head = pb.PutChunk(chunk_index=chunk_index, last_part=last_part).SerializeToString()
    size = len(object_part)
    inner = len(head) + len(_PUT_CHUNK_OBJECT_PART) + len(_varint(size)) + size
    return b"".join((_PUT_REQUEST_CHUNK, _varint(inner), head, _PUT_CHUNK_OBJECT_PART,
                     _varint(size), object_part))


@dataclass(frozen=True, slots=True)
class GetMessage:
    """A received GetResponse (proto field meanings); ``data`` views the message."""

    chunk_index: int
    layer: int | None  # None when the field is absent (a whole object)
    data: memoryview
    checksum_xxh3: int
    num_chunks: int
    num_chunks_in_data: int = 1  # chunks of ``layer`` in ``data`` (layer-major order)


# Field number -> wire type of GetResponse; every field but data (3) is a varint.
_GET_WIRE = {1: 0, 2: 0, 3: 2, 4: 0, 5: 0, 6: 0}
_GET_VARINTS = {1: "chunk_index", 2: "layer", 4: "checksum_xxh3", 5: "num_chunks",
                6: "num_chunks_in_data"}


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise Corrupt("GetResponse: truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def parse_get_response(message: bytes) -> GetMessage:
    """Parse a serialised GetResponse (any field order, unknown fields skipped).

    Raises:
        Corrupt: bytes that are not a well-formed GetResponse.
    """
    buf = memoryview(message)
    fields: dict[str, int] = {}
    data = buf[0:0]
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if not 1 <= number < 1 << 29:
            raise Corrupt(f"GetResponse: field number {number} is out of range")
        if _GET_WIRE.get(number, wire) != wire or wire not in (0, 1, 2, 5):
            raise Corrupt(f"GetResponse: field {number} has wire type {wire}")
        if wire == 0:
            value, pos = _read_varint(buf, pos)
            if number in _GET_VARINTS:
                fields[_GET_VARINTS[number]] = value & 0xFFFFFFFFFFFFFFFF
        elif wire == 2:
            size, pos = _read_varint(buf, pos)
            if pos + size > len(buf):
                raise Corrupt(f"GetResponse: field {number} runs {pos + size - len(buf)} "
                              "bytes past the message")
            if number == 3:
                data = buf[pos : pos + size]
            pos += size
        else:  # fixed64 / fixed32 of an unknown field
            pos += 8 if wire == 1 else 4
    if pos != len(buf):
        raise Corrupt("GetResponse: last field runs past the message")
    return GetMessage(chunk_index=fields.get("chunk_index", 0) & 0xFFFFFFFF,
                      layer=fields["layer"] & 0xFFFFFFFF if "layer" in fields else None,
                      data=data, checksum_xxh3=fields.get("checksum_xxh3", 0),
                      num_chunks=fields.get("num_chunks", 0) & 0xFFFFFFFF,
                      num_chunks_in_data=(fields.get("num_chunks_in_data", 0) & 0xFFFFFFFF) or 1)


def serialize(message: Any) -> bytes:
    """gRPC serializer: framed bytes pass through, protobuf messages are serialised."""
    if isinstance(message, bytes):
        return message
    return message.SerializeToString()


def stub(channel: Any) -> pb_grpc.KVStoreStub:
    """A client stub (sync or aio channel) whose Put sends framed parts as they are and
    whose Get yields :class:`GetMessage` (hand-parsed, ``data`` not copied)."""
    made = pb_grpc.KVStoreStub(channel)
    made.Put = channel.stream_unary(  # type: ignore[method-assign]
        "/kvstore.v1.KVStore/Put", request_serializer=serialize,
        response_deserializer=pb.PutResponse.FromString)
    made.Get = channel.unary_stream(  # type: ignore[method-assign]
        "/kvstore.v1.KVStore/Get", request_serializer=pb.GetRequest.SerializeToString,
        response_deserializer=parse_get_response)
    return made
