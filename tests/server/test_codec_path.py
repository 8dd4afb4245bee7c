"""The kvq codec in the data path: a real daemon on port 0, clients putting compressed chunks."""

from __future__ import annotations

import asyncio
import dataclasses

import grpc
import numpy as np
import pytest
import torch

import kvstore.codec as codec
from kvstore import AsyncClient
from kvstore._proto import kvstore_pb2 as pb
from kvstore._proto import kvstore_pb2_grpc as pb_grpc
from kvstore.client._protocol import namespace_to_proto
from kvstore.codec import autocal
from kvstore.codec.format import CodecId, pack_object, parse_object, read_header
from kvstore.layout import KVLayout
from tests.conftest import make_kv, make_tokens

LEVEL = "balanced"


def _storage(t: torch.Tensor) -> np.ndarray:
    """A decoded tensor as the client's numpy storage (bfloat16 as uint16 bits)."""
    t = t.cpu()
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()


def _codec_round_trip(kv: np.ndarray, layout: KVLayout, namespace: str) -> np.ndarray:
    """What a kvq put then get must return: each chunk through encode (with the table
    the client's automatic calibration picked for the namespace) then decode."""
    step = layout.chunk_tokens
    chunks = [kv[:, :, :, i:i + step] for i in range(0, kv.shape[3], step)]
    tables = [autocal.table_for(namespace, layout, c) for c in chunks]
    assert all(t is not None and t.model.startswith("stats:") for t in tables)
    return np.concatenate([_storage(codec.decode(codec.encode(c, layout, LEVEL, table=t)))
                           for c, t in zip(chunks, tables, strict=True)], axis=3)


def _kvq_object(layout: KVLayout, seed: int = 0) -> tuple[np.ndarray, bytes]:
    tokens = make_tokens(layout.chunk_tokens, seed=seed)
    return tokens, codec.encode(make_kv(layout, layout.chunk_tokens, seed=seed), layout, LEVEL)


@pytest.fixture
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.KVStoreStub(channel)


def _put(stub, layout: KVLayout, tokens: np.ndarray, obj: bytes) -> None:
    ns = namespace_to_proto("model@rev", layout, 0)
    stub.Put(iter([pb.PutRequest(header=pb.PutHeader(namespace=ns, tokens_le_i32=tokens.tobytes())),
                   pb.PutRequest(chunk=pb.PutChunk(chunk_index=0, object_part=obj,
                                                   last_part=True))]))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_kvq_put_then_server_decoded_get_equals_codec_round_trip(client, layout, dtype):
    lay = dataclasses.replace(layout, dtype=dtype)
    tokens, kv = make_tokens(48), make_kv(lay, 48)
    c = client(f"kvq-{dtype}", lay, codec=LEVEL, transport="stream")
    assert c.put(tokens, kv) == 48
    got = c.get(tokens, as_numpy=True)
    assert got.tobytes() == _codec_round_trip(kv, lay, f"kvq-{dtype}").tobytes()
    assert not np.array_equal(got, kv)  # lossy: the daemon did not store raw bytes


def test_client_decode_equals_server_decode(client, layout):
    tokens, kv = make_tokens(32), make_kv(layout, 32)
    c = client(codec=LEVEL, transport="stream")
    c.put(tokens, kv)
    server_side = c.get(tokens)
    client_side = c.get(tokens, decode="client")
    assert isinstance(client_side, torch.Tensor) and torch.equal(client_side, server_side)
    assert np.array_equal(c.get(tokens, layers=[1, 3], decode="client", as_numpy=True),
                          c.get(tokens, layers=[1, 3], as_numpy=True))
    assert c.get(make_tokens(32, seed=9), decode="client") is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_client_decode_on_cuda_is_close_to_cpu_decode(client, layout):
    tokens, kv = make_tokens(32), make_kv(layout, 32)
    c = client(codec=LEVEL, transport="stream")
    c.put(tokens, kv)
    on_gpu = c.get(tokens, decode="client", device="cuda")
    assert on_gpu.is_cuda and on_gpu.shape == layout.shape(32)
    torch.testing.assert_close(on_gpu.float().cpu(), c.get(tokens).float(), rtol=2e-3,
                               atol=2e-3)


def test_kvq_object_is_stored_smaller_than_raw(client, layout, stub, server):
    tokens, kv = make_tokens(16), make_kv(layout, 16)
    client(codec=LEVEL).put(tokens, kv)
    request = pb.GetRequest(namespace=namespace_to_proto("model@rev", layout, 0),
                            tokens_le_i32=tokens.tobytes(), encoded=True)
    (msg,) = list(stub.Get(request))
    raw_bytes = len(codec.encode_raw(kv, layout))
    assert read_header(msg.data).codec_id == CodecId.KVQ
    assert len(msg.data) < raw_bytes / 2
    cpu = next(t for t in client().stats()["tiers"] if t["num_objects"] == 1)
    assert cpu["used_bytes"] < raw_bytes / 2


def test_raw_and_kvq_puts_in_one_namespace_both_round_trip(client, layout):
    raw_tokens, raw_kv = make_tokens(32, seed=1), make_kv(layout, 32, seed=1)
    kvq_tokens, kvq_kv = make_tokens(32, seed=2), make_kv(layout, 32, seed=2)
    client().put(raw_tokens, raw_kv)
    client(codec=LEVEL).put(kvq_tokens, kvq_kv)
    for transport in ("stream", "arena"):
        reader = client(transport=transport)
        assert np.array_equal(reader.get(raw_tokens, as_numpy=True), raw_kv)
        assert reader.get(kvq_tokens, as_numpy=True).tobytes() == \
            _codec_round_trip(kvq_kv, layout, "model@rev").tobytes()


def test_tiny_kvq_chunk_is_sent_raw_when_kvq_is_not_smaller(client, layout):
    tokens, kv = make_tokens(2), make_kv(layout, 2)
    c = client(codec=LEVEL)
    assert c.put_chunk(tokens, kv)
    assert np.array_equal(c.get_chunk(tokens, as_numpy=True), kv)  # bit-exact: stored raw


def test_put_of_damaged_kvq_object_is_invalid_argument(stub, layout):
    tokens, obj = _kvq_object(layout)
    flipped = bytearray(obj)
    flipped[-3] ^= 0x10
    parsed = parse_object(obj)
    h = parsed.header
    unknown_level = pack_object(  # valid checksum, level no encoder writes
        codec_id=CodecId.KVQ, codec_level=9, dtype=h.dtype, num_layers=h.num_layers,
        num_kv_heads=h.num_kv_heads, head_dim=h.head_dim, num_tokens=h.num_tokens,
        sections=[bytes(s) for s in parsed.sections], meta=bytes(parsed.meta))
    _, short = _kvq_object(dataclasses.replace(layout, chunk_tokens=8))
    for bad, fragment in ((bytes(flipped), "checksum"), (unknown_level, "level"),
                          (short, "tokens=8")):
        with pytest.raises(grpc.RpcError) as info:
            _put(stub, layout, tokens, bad)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert fragment in info.value.details()
    _put(stub, layout, tokens, obj)  # the intact object is accepted


def test_arena_path_with_kvq_objects_equals_stream_path(client, layout):
    tokens, kv = make_tokens(48), make_kv(layout, 48)
    client(codec=LEVEL).put(tokens, kv)
    rag = make_tokens(16, seed=4)
    client(codec=LEVEL).put_chunk(rag, make_kv(layout, 16, seed=4))
    arena, stream = client(transport="arena"), client(transport="stream")
    for layers in (None, [0, 2]):
        a = arena.get(tokens, layers=layers, as_numpy=True)
        assert a.tobytes() == stream.get(tokens, layers=layers, as_numpy=True).tobytes()
    assert arena.get_chunk(rag, as_numpy=True).tobytes() == \
        stream.get_chunk(rag, as_numpy=True).tobytes()


def test_async_client_puts_kvq_and_decodes_on_either_side(server, layout):
    tokens, kv = make_tokens(32), make_kv(layout, 32)

    async def main() -> tuple[torch.Tensor, torch.Tensor]:
        async with AsyncClient(server.address, "m-async", layout, codec=LEVEL,
                               transport="stream") as c:
            await c.put(tokens, kv)
            return await c.get(tokens), await c.get(tokens, decode="client")

    server_side, client_side = asyncio.run(main())
    assert torch.equal(server_side, client_side)
    assert _storage(server_side).tobytes() == _codec_round_trip(kv, layout, "m-async").tobytes()


def test_unknown_codec_or_decode_site_is_invalid_argument(client, layout):
    from kvstore.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="codec must be one of"):
        client(codec="zstd")
    with pytest.raises(InvalidArgument, match="decode must be one of"):
        client().get(make_tokens(16), decode="gpu")
