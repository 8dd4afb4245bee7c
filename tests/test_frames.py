"""Hand-framed bulk messages parse to exactly what protobuf would have built."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore import _frames as frames
from kvstore._proto import kvstore_pb2 as pb
from kvstore.errors import Corrupt


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


def _fields(msg: frames.GetMessage | pb.GetResponse) -> tuple:
    """The known fields (protobuf also keeps unknown ones, which equality compares)."""
    layer = msg.layer if isinstance(msg, frames.GetMessage) or msg.HasField("layer") else None
    return (msg.chunk_index, layer, bytes(msg.data), msg.checksum_xxh3, msg.num_chunks)


@pytest.mark.parametrize("layer", [None, 0, 7])
@pytest.mark.parametrize("size", [0, 1, 300, 196608])
def test_parse_get_response_reads_framed_and_protobuf_bytes_alike(layer, size) -> None:
    data = bytes(i % 253 for i in range(size))
    expected = pb.GetResponse(chunk_index=3, layer=layer, data=data, checksum_xxh3=2**64 - 5,
                              num_chunks=4)
    for wire in (expected.SerializeToString(),
                 frames.get_response(chunk_index=3, layer=layer, data=data,
                                     checksum_xxh3=2**64 - 5, num_chunks=4)):
        parsed = frames.parse_get_response(wire)
        assert _fields(parsed) == _fields(expected)
        assert isinstance(parsed.data, memoryview)  # a view, not a copy


def test_parse_get_response_skips_unknown_fields_and_keeps_the_last_value() -> None:
    unknown = (b"\x30\x96\x01"  # field 6 varint
               b"\x39" + bytes(8)  # field 7 fixed64
               + b"\x45" + bytes(4)  # field 8 fixed32
               + b"\x4a\x03abc")  # field 9 bytes
    wire = (frames.get_response(chunk_index=1, data=b"xy", num_chunks=2) + unknown
            + pb.GetResponse(chunk_index=5).SerializeToString())
    parsed = frames.parse_get_response(wire)
    assert _fields(parsed) == _fields(pb.GetResponse.FromString(wire))
    assert (parsed.chunk_index, bytes(parsed.data), parsed.layer) == (5, b"xy", None)


@pytest.mark.parametrize("wire", [
    b"\x08",  # varint cut short
    b"\x1a\x05abc",  # data runs past the end
    b"\x08" + b"\xff" * 11,  # overlong varint
    b"\x1d\x00\x00\x00\x00",  # data (field 3) as fixed32
    b"\x0a\x01x",  # chunk_index (field 1) as bytes
    b"\x39\x00",  # fixed64 cut short
    b"\x0b",  # a group (wire type 3)
    b"\x00\x00",  # field number 0
])
def test_parse_get_response_raises_corrupt_on_malformed_bytes(wire: bytes) -> None:
    with pytest.raises(Corrupt):
        frames.parse_get_response(wire)


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=64))
def test_parse_get_response_never_accepts_what_protobuf_rejects(wire: bytes) -> None:
    try:
        parsed = frames.parse_get_response(wire)
    except Corrupt:
        return  # stricter than protobuf on wrong wire types is allowed
    assert _fields(parsed) == _fields(pb.GetResponse.FromString(wire))
