"""The servicer through the generated stub, bypassing the client's validation."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from kvstore._proto import kvstore_pb2 as pb
from kvstore._proto import kvstore_pb2_grpc as pb_grpc
from kvstore.client import Client
from kvstore.codec.raw import decode_raw, encode_raw
from kvstore.errors import CapacityExhausted, InvalidArgument
from kvstore.layout import KVLayout
from kvstore.server.app import ServerThread, create_server
from tests.conftest import make_config, make_kv, make_tokens


def _ns(layout: KVLayout, name: str = "raw") -> pb.Namespace:
    return pb.Namespace(name=name, layout=pb.Layout(
        num_layers=layout.num_layers, num_kv_heads=layout.num_kv_heads,
        head_dim=layout.head_dim, dtype=pb.DTYPE_FLOAT16, chunk_tokens=layout.chunk_tokens))


@pytest.fixture
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.KVStoreStub(channel)


def _header(layout: KVLayout, tokens: np.ndarray, **kw) -> pb.PutRequest:
    return pb.PutRequest(header=pb.PutHeader(namespace=_ns(layout), tokens_le_i32=tokens.tobytes(),
                                             **kw))


def _chunk(index: int, obj: bytes, last: bool = True) -> pb.PutRequest:
    return pb.PutRequest(chunk=pb.PutChunk(chunk_index=index, object_part=obj, last_part=last))


def _put_code(stub, messages) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        stub.Put(iter(messages))
    return info.value.code(), info.value.details()


def _objects(layout: KVLayout, n: int) -> tuple[np.ndarray, list[bytes]]:
    tokens, kv = make_tokens(n * layout.chunk_tokens), make_kv(layout, n * layout.chunk_tokens)
    step = layout.chunk_tokens
    return tokens, [encode_raw(kv[:, :, :, i * step:(i + 1) * step], layout) for i in range(n)]


def test_put_without_header_is_invalid_argument(stub, layout):
    _, objs = _objects(layout, 1)
    code, details = _put_code(stub, [_chunk(0, objs[0])])
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "header" in details
    assert _put_code(stub, [])[0] == grpc.StatusCode.INVALID_ARGUMENT


def test_put_with_bad_tokens_bytes_is_invalid_argument(stub, layout):
    bad = pb.PutRequest(header=pb.PutHeader(namespace=_ns(layout), tokens_le_i32=b"\x01" * 10))
    code, details = _put_code(stub, [bad])
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "10 bytes" in details


def test_put_of_forged_object_is_invalid_argument(stub, layout):
    tokens, objs = _objects(layout, 1)
    forged = bytearray(objs[0])
    forged[-1] ^= 0xFF
    code, details = _put_code(stub, [_header(layout, tokens), _chunk(0, bytes(forged))])
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "checksum" in details
    assert stub.Lookup(pb.LookupRequest(namespace=_ns(layout), tokens_le_i32=tokens.tobytes()),
                       ).num_tokens == 0


@pytest.mark.parametrize("indexes, fragment", [
    ((2,), "out of range"), ((1, 0), "must increase"), ((0, 0), "must increase"),
])
def test_put_with_wrong_chunk_index_is_invalid_argument(stub, layout, indexes, fragment):
    tokens, objs = _objects(layout, 2)
    messages = [_header(layout, tokens)] + [_chunk(i, objs[min(i, 1)]) for i in indexes]
    code, details = _put_code(stub, messages)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and fragment in details


def test_put_of_object_with_other_layout_is_invalid_argument(stub, layout):
    tokens, _ = _objects(layout, 1)
    other = KVLayout(4, 2, 64, "float16", 16)
    obj = encode_raw(make_kv(other, 16), other)
    code, details = _put_code(stub, [_header(layout, tokens), _chunk(0, obj)])
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "heads=2" in details and "heads=3" in details


def test_put_of_unfinished_chunk_is_invalid_argument(stub, layout):
    tokens, objs = _objects(layout, 1)
    messages = [_header(layout, tokens), _chunk(0, objs[0][:100], last=False)]
    code, details = _put_code(stub, messages)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "last_part" in details


def test_put_in_parts_is_reassembled(stub, layout):
    tokens, objs = _objects(layout, 2)
    parts = [_chunk(i, obj[j:j + 1000], last=j + 1000 >= len(obj))
             for i, obj in enumerate(objs) for j in range(0, len(obj), 1000)]
    resp = stub.Put(iter([_header(layout, tokens), *parts]))
    assert resp.num_chunks_stored == 2
    again = stub.Put(iter([_header(layout, tokens), _chunk(0, objs[0])]))
    assert (again.num_chunks_stored, again.num_chunks_present) == (0, 1)


def test_unspecified_dtype_is_invalid_argument(stub, layout):
    ns = _ns(layout)
    ns.layout.dtype = pb.DTYPE_UNSPECIFIED
    with pytest.raises(grpc.RpcError) as info:
        stub.Lookup(pb.LookupRequest(namespace=ns, tokens_le_i32=b""))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "DTYPE_UNSPECIFIED" in info.value.details()


def test_unknown_namespace_is_a_miss_not_an_error(stub, layout):
    request = dict(namespace=_ns(layout, "nobody"), tokens_le_i32=make_tokens(64).tobytes())
    assert stub.Lookup(pb.LookupRequest(**request)).num_tokens == 0
    assert list(stub.Get(pb.GetRequest(**request))) == []


def test_encoded_get_returns_objects_as_stored(stub, layout):
    tokens, objs = _objects(layout, 2)
    stub.Put(iter([_header(layout, tokens), _chunk(0, objs[0]), _chunk(1, objs[1])]))
    got = list(stub.Get(pb.GetRequest(namespace=_ns(layout), tokens_le_i32=tokens.tobytes(),
                                      encoded=True)))
    assert [m.data for m in got] == objs and all(m.num_chunks == 2 for m in got)
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Get(pb.GetRequest(namespace=_ns(layout), tokens_le_i32=tokens.tobytes(),
                                    encoded=True, order=pb.ORDER_LAYER_MAJOR)))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_raw_get_sends_whole_objects_unless_layers_are_filtered(stub, layout):
    tokens, objs = _objects(layout, 2)
    stub.Put(iter([_header(layout, tokens), _chunk(0, objs[0]), _chunk(1, objs[1])]))
    request = dict(namespace=_ns(layout), tokens_le_i32=tokens.tobytes())
    whole = list(stub.Get(pb.GetRequest(**request)))
    assert [(m.chunk_index, m.HasField("layer")) for m in whole] == [(0, False), (1, False)]
    assert [m.data for m in whole] == objs  # raw objects are stored as sent
    per_layer = list(stub.Get(pb.GetRequest(**request, layers=[0, 1])))
    assert [(m.chunk_index, m.layer) for m in per_layer] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert per_layer[1].data == decode_raw(objs[0])[1][1].tobytes()


def test_layer_major_groups_chunks_per_message_within_the_clients_limit(stub, layout):
    tokens, objs = _objects(layout, 3)
    stub.Put(iter([_header(layout, tokens)] + [_chunk(i, o) for i, o in enumerate(objs)]))
    request = dict(namespace=_ns(layout), tokens_le_i32=tokens.tobytes(),
                   order=pb.ORDER_LAYER_MAJOR)
    grouped = list(stub.Get(pb.GetRequest(**request)))
    assert [(m.layer, m.chunk_index, m.num_chunks_in_data) for m in grouped] == [
        (layer, 0, 3) for layer in range(layout.num_layers)]
    layer1 = np.concatenate([decode_raw(o)[1][1] for o in objs], axis=0)  # [3 * 2, ...]
    assert grouped[1].data == layer1.tobytes()
    one_layer = len(decode_raw(objs[0])[1][0].tobytes())
    small = list(stub.Get(pb.GetRequest(**request, max_response_bytes=2 * one_layer + 1024)))
    assert [(m.layer, m.chunk_index, m.num_chunks_in_data) for m in small][:2] == [
        (0, 0, 2), (0, 2, 0)]
    whole = list(stub.Get(pb.GetRequest(namespace=_ns(layout), tokens_le_i32=tokens.tobytes(),
                                        max_response_bytes=len(objs[0]))))
    assert all(m.HasField("layer") for m in whole)  # whole objects would not fit: per layer


def test_raw_chunks_over_the_message_limit_are_sent_per_layer(tmp_path):
    # Over the daemon's limit (2 MiB) and over a client's (1 MiB): both get layers.
    config = make_config(tmp_path / "d", **{"server.max_message_bytes": 2 << 20})
    lay = KVLayout(num_layers=30, num_kv_heads=3, head_dim=64, chunk_tokens=256)  # 5.9 MB
    tokens, kv = make_tokens(512), make_kv(lay, 512)
    with ServerThread(config) as srv, Client(srv.address, "smollm2", lay, transport="stream",
                                             max_message_bytes=1 << 20) as c:
        assert c.put(tokens, kv) == 512
        assert np.array_equal(c.get(tokens, as_numpy=True), kv)
        with Client(srv.address, "smollm2", lay, transport="stream") as roomy:
            assert np.array_equal(roomy.get(tokens, as_numpy=True), kv)
        with grpc.insecure_channel(srv.address) as channel:
            got = list(pb_grpc.KVStoreStub(channel).Get(pb.GetRequest(
                namespace=_ns(lay, "smollm2"), tokens_le_i32=tokens.tobytes())))
    assert [(m.chunk_index, m.layer) for m in got] == [(c, i) for c in range(2) for i in range(30)]


def test_get_with_bad_layer_list_is_invalid_argument(stub, layout):
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Get(pb.GetRequest(namespace=_ns(layout), tokens_le_i32=b"", layers=[9])))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "9" in info.value.details()


def test_stats_counts_requests_and_failures(stub, layout):
    before = stub.Stats(pb.StatsRequest())
    _put_code(stub, [])
    after = stub.Stats(pb.StatsRequest())
    assert after.requests == before.requests + 2
    assert after.failed_requests == before.failed_requests + 1
    assert after.uptime_ms >= before.uptime_ms and after.version


def test_create_server_returns_bound_port(tmp_path):
    import asyncio

    from kvstore.engine import Engine

    config = make_config(tmp_path / "d")

    async def run() -> int:
        engine = Engine.from_config(config)
        server, port = create_server(config, engine)
        await server.start()
        await server.stop(None)
        engine.close()
        return port

    assert asyncio.run(run()) > 0


def test_corrupt_object_on_disk_is_a_miss_and_counted(tmp_path, layout):
    config = make_config(tmp_path / "d")
    tokens, kv = make_tokens(48), make_kv(layout, 48)
    with ServerThread(config) as srv, Client(srv.address, "m", layout) as c:
        c.put(tokens, kv)
    files = sorted((tmp_path / "d").rglob("*.kvc"))
    assert len(files) == 3
    with ServerThread(config) as srv, Client(srv.address, "m", layout) as c:
        first = c.get(tokens[:16], as_numpy=True)  # chunk 0 now in DRAM, tells us nothing
        assert np.array_equal(first, kv[:, :, :, :16])
        for f in files:  # flip one byte of every file; only chunks 1, 2 are still on disk only
            data = bytearray(f.read_bytes())
            data[len(data) // 2] ^= 0x5A
            f.write_bytes(bytes(data))
        back = c.get(tokens, as_numpy=True)
        assert np.array_equal(back, kv[:, :, :, :16])
        assert sum(t["corrupt"] for t in c.stats()["tiers"]) >= 1
        # The daemon keeps serving: puts rewrite what reads found corrupt (a corrupt file
        # is only found when read, so healing may take a read per corrupt chunk).
        for _ in range(len(files)):
            c.put(tokens, kv)
            back = c.get(tokens, as_numpy=True)
            assert np.array_equal(back, kv[:, :, :, : back.shape[3]])
        assert np.array_equal(back, kv)


def test_namespace_layout_survives_restart(tmp_path, layout):
    config = make_config(tmp_path / "d")
    with ServerThread(config) as srv, Client(srv.address, "m", layout) as c:
        c.put(make_tokens(16), make_kv(layout, 16))
    other = KVLayout(2, 3, 64, "float16", 16)
    with ServerThread(config) as srv, Client(srv.address, "m", other) as c:
        with pytest.raises(InvalidArgument, match="registered"):
            c.put(make_tokens(16), make_kv(other, 16))


def test_put_larger_than_every_tier_is_capacity_exhausted(tmp_path, layout):
    config = make_config(tmp_path / "d", **{"tiers.cpu.capacity_bytes": 4096,
                                            "tiers.disk.enabled": False})
    with ServerThread(config) as srv, Client(srv.address, "m", layout) as c:
        with pytest.raises(CapacityExhausted, match="no tier accepted"):
            c.put(make_tokens(16), make_kv(layout, 16))
        assert c.lookup(make_tokens(16)) == 0
