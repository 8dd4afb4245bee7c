"""Hand-framed bulk messages parse to exactly what protobuf would have built."""

from __future__ import annotations

import pytest

from kvstore import _frames as frames
from kvstore._proto import kvstore_pb2 as pb


@pytest.mark.parametrize("size", [0, 1, 127, 128, 16383, 16384, 196608, (1 << 21) + 3])
@pytest.mark.parametrize("layer", [None, 0, 29])
def test_get_response_parses_to_the_protobuf_message(size: int, layer: int | None) -> None:
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    framed = frames.get_response(chunk_index=7, layer=layer, data=memoryview(data),
                                 checksum_xxh3=2**64 - 1, num_chunks=9)
    expected = pb.GetResponse(chunk_index=7, layer=layer, data=data, checksum_xxh3=2**64 - 1,
                              num_chunks=9)
    parsed = pb.GetResponse.FromString(framed)
    assert parsed == expected
    assert parsed.HasField("layer") == (layer is not None)
    # protobuf leaves an empty bytes field out; framing writes it (2 bytes more)
    assert len(framed) == expected.ByteSize() + (2 if size == 0 else 0)


@pytest.mark.parametrize("size", [0, 5, 300, 1 << 20])
@pytest.mark.parametrize("last", [False, True])
def test_put_chunk_request_parses_to_the_protobuf_message(size: int, last: bool) -> None:
    part = bytes(i % 251 for i in range(size))
    framed = frames.put_chunk_request(chunk_index=300, object_part=part, last_part=last)
    expected = pb.PutRequest(chunk=pb.PutChunk(chunk_index=300, object_part=part,
                                               last_part=last))
    parsed = pb.PutRequest.FromString(framed)
    assert parsed == expected
    assert parsed.WhichOneof("msg") == "chunk"
    # protobuf leaves an empty bytes field out; framing writes it (2 bytes more)
    assert len(framed) == expected.ByteSize() + (2 if size == 0 else 0)


def test_serialize_passes_bytes_through_and_serialises_messages() -> None:
    framed = frames.get_response(chunk_index=0, data=b"xyz", num_chunks=1)
    assert frames.serialize(framed) is framed
    msg = pb.GetResponse(chunk_index=1, num_chunks=2)
    assert frames.serialize(msg) == msg.SerializeToString()


@pytest.mark.parametrize("size", [1, 4096, 1 << 20])
def test_fetch_blocks_response_parses_to_the_protobuf_message(size: int) -> None:
    data = bytes(i % 253 for i in range(size))
    framed = frames.fetch_blocks_response(data=memoryview(data), block_bytes=128)
    expected = pb.FetchBlocksResponse(data=data, block_bytes=128)
    assert pb.FetchBlocksResponse.FromString(framed) == expected
    assert len(framed) == expected.ByteSize()
