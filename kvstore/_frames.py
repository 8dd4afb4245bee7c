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
"""

from __future__ import annotations

from typing import Any

from kvstore._proto import kvstore_pb2 as pb
from kvstore._proto import kvstore_pb2_grpc as pb_grpc

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
                 checksum_xxh3: int = 0) -> bytes:
    """A serialised ``GetResponse`` carrying ``data`` (any bytes-like object)."""
    head = pb.GetResponse(chunk_index=chunk_index, layer=layer,
                          checksum_xxh3=checksum_xxh3, num_chunks=num_chunks).SerializeToString()
    return b"".join((head, _GET_RESPONSE_DATA, _varint(len(data)), data))


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


def serialize(message: Any) -> bytes:
    """gRPC serializer: framed bytes pass through, protobuf messages are serialised."""
    if isinstance(message, bytes):
        return message
    return message.SerializeToString()


def stub(channel: Any) -> pb_grpc.KVStoreStub:
    """A client stub (sync or aio channel) whose Put sends framed parts as they are."""
    made = pb_grpc.KVStoreStub(channel)
    made.Put = channel.stream_unary(  # type: ignore[method-assign]
        "/kvstore.v1.KVStore/Put", request_serializer=serialize,
        response_deserializer=pb.PutResponse.FromString)
    return made
