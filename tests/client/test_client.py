"""The blocking Client against a real daemon on port 0: round trips, misses, bad input."""

from __future__ import annotations

import dataclasses
import socket
import threading

import numpy as np
import pytest
import torch
import xxhash

from kvstore import _frames as frames
from kvstore._proto import kvstore_pb2 as pb
from kvstore.client import Client
from kvstore.client._protocol import GetAssembler
from kvstore.errors import CapacityExhausted, Corrupt, DeadlineExceeded, InvalidArgument
from kvstore.layout import KVLayout
from tests.conftest import SMOLLM2_LAYOUT, make_config, make_kv, make_tokens


def _torch(arr: np.ndarray, dtype: str) -> torch.Tensor:
    if dtype == "bfloat16":
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(arr)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_round_trip_is_bit_exact_for_each_dtype(client, layout, dtype, kind):
    lay = dataclasses.replace(layout, dtype=dtype)
    c = client(f"rt-{dtype}", lay)
    tokens, kv = make_tokens(48), make_kv(lay, 48)
    given = kv if kind == "numpy" else _torch(kv, dtype)
    assert c.put(tokens, given) == 48
    back_np = c.get(tokens, as_numpy=True)
    assert back_np.dtype == kv.dtype and np.array_equal(back_np, kv)
    back = c.get(tokens)
    assert isinstance(back, torch.Tensor) and back.dtype == _torch(kv, dtype).dtype
    assert torch.equal(back.view(torch.int16 if dtype != "float32" else torch.int32),
                       _torch(kv, dtype).view(torch.int16 if dtype != "float32" else torch.int32))


def test_put_ignores_partial_last_chunk(client, layout):
    c = client()
    tokens, kv = make_tokens(40), make_kv(layout, 40)
    assert c.put(tokens, kv) == 32
    assert c.lookup(tokens) == 32
    assert np.array_equal(c.get(tokens, as_numpy=True), kv[:, :, :, :32])


def test_put_shorter_than_a_chunk_stores_nothing(client, layout):
    c = client()
    assert c.put(make_tokens(5), make_kv(layout, 5)) == 0
    assert c.lookup(make_tokens(5)) == 0


def test_lookup_returns_longest_stored_prefix(client, layout):
    c = client()
    tokens, kv = make_tokens(64), make_kv(layout, 64)
    c.put(tokens[:48], kv[:, :, :, :48])
    assert c.lookup(tokens) == 48
    diverged = tokens.copy()
    diverged[20] += 1  # inside chunk 1: only chunk 0 still matches
    assert c.lookup(diverged) == 16


def test_lookup_of_never_stored_tokens_is_zero(client):
    c = client("never-written")
    assert c.lookup(make_tokens(64, seed=9)) == 0
    assert c.get(make_tokens(64, seed=9)) is None


def test_get_of_partly_stored_sequence_returns_stored_leading_chunks(client, layout):
    c = client()
    tokens, kv = make_tokens(64), make_kv(layout, 64)
    c.put(tokens[:32], kv[:, :, :, :32])
    back = c.get(tokens, as_numpy=True)
    assert back.shape == layout.shape(32)
    assert np.array_equal(back, kv[:, :, :, :32])


def test_put_resends_only_chunks_not_yet_stored(client, layout, server):
    c = client()
    tokens, kv = make_tokens(64), make_kv(layout, 64)
    c.put(tokens[:32], kv[:, :, :, :32])
    before = server.counters.received_bytes
    assert c.put(tokens, kv) == 64
    chunk_object_bytes = server.counters.received_bytes - before
    assert chunk_object_bytes < 3 * layout.chunk_bytes  # two chunks sent, not four
    assert np.array_equal(c.get(tokens, as_numpy=True), kv)


@pytest.mark.parametrize("transport", ["stream", "arena"])
def test_get_layers_yields_each_layer_in_order(client, layout, server, transport):
    c = client(transport=transport)
    tokens, kv = make_tokens(48), make_kv(layout, 48)
    c.put(tokens, kv)
    sent_before = server.counters.sent_bytes
    seen = list(c.get_layers(tokens, as_numpy=True))
    assert [layer for layer, _ in seen] == list(range(layout.num_layers))
    for layer, arr in seen:
        assert np.array_equal(arr, kv[layer])
    # the arena path moves no tensor bytes through the socket; the stream moves them all
    moved = server.counters.sent_bytes - sent_before
    assert moved == 0 if transport == "arena" else moved >= kv.nbytes
    picked = [(layer, arr) for layer, arr in c.get_layers(tokens, layers=[3, 1], as_numpy=True)]
    assert [layer for layer, _ in picked] == [1, 3]
    assert all(np.array_equal(arr, kv[layer]) for layer, arr in picked)
    assert list(c.get_layers(make_tokens(48, seed=99))) == []  # nothing stored: no layers


def test_get_with_layer_filter_returns_only_those_layers(client, layout):
    c = client()
    tokens, kv = make_tokens(48), make_kv(layout, 48)
    c.put(tokens, kv)
    back = c.get(tokens, layers=[0, 2], as_numpy=True)
    assert np.array_equal(back, kv[[0, 2]])


def _bad_inputs(layout: KVLayout):
    kv = make_kv(layout, 32)
    return {
        "wrong rank": (make_tokens(32), kv[0], "rank 5", "rank 4"),
        "wrong shape": (make_tokens(32), make_kv(dataclasses.replace(layout, num_kv_heads=2), 32),
                        "(4, 2, 3, 32, 64)", "(4, 2, 2, 32, 64)"),
        "int32 dtype": (make_tokens(32), kv.astype(np.int32), "int32", "float16"),
        "float64 dtype": (make_tokens(32), kv.astype(np.float64), "float64", "float16"),
        "token count": (make_tokens(31), kv, "32 tokens", "31 tokens"),
    }


@pytest.mark.parametrize("case", ["wrong rank", "wrong shape", "int32 dtype", "float64 dtype",
                                  "token count"])
def test_bad_input_is_invalid_argument_and_daemon_keeps_serving(client, layout, case):
    c = client()
    tokens, kv, expected, seen = _bad_inputs(layout)[case]
    with pytest.raises(InvalidArgument) as info:
        c.put(tokens, kv)
    assert expected in str(info.value) and seen in str(info.value)
    good_tokens = make_tokens(32, seed=3)
    assert c.put(good_tokens, make_kv(layout, 32, seed=3)) == 32


def test_layout_clash_with_namespace_is_invalid_argument(client, layout):
    client("shared").put(make_tokens(32), make_kv(layout, 32))
    other = dataclasses.replace(layout, num_layers=2)
    with pytest.raises(InvalidArgument) as info:
        client("shared", other).put(make_tokens(32, seed=4), make_kv(other, 32))
    assert "layers=4" in str(info.value) and "layers=2" in str(info.value)
    with pytest.raises(InvalidArgument):
        client("shared", other).lookup(make_tokens(32))
    assert client("shared").lookup(make_tokens(32)) == 32


def test_oversize_message_is_capacity_exhausted(tmp_path, layout):
    from kvstore.server.app import ServerThread

    config = make_config(tmp_path / "d", **{"server.max_message_bytes": 256 << 10})
    big = dataclasses.replace(layout, chunk_tokens=512)  # 768 KiB object per chunk
    # Streamed puts are bound by the message limit; same-host puts send no object bytes.
    with ServerThread(config) as srv, Client(srv.address, "big", big,
                                             transport="stream") as c:
        with pytest.raises(CapacityExhausted) as info:
            c.put(make_tokens(512), make_kv(big, 512))
        assert str(256 << 10) in str(info.value)
        assert c.put(make_tokens(16), make_kv(big, 16)) == 0  # daemon still answers
        small = Client(srv.address, "small", layout)
        assert small.put(make_tokens(32), make_kv(layout, 32)) == 32
        small.close()


def test_large_objects_are_split_into_parts(tmp_path):
    from kvstore.server.app import ServerThread

    config = make_config(tmp_path / "d", **{"server.max_message_bytes": 2 << 20})
    lay = SMOLLM2_LAYOUT  # 5.9 MB per chunk, three times the message limit
    tokens, kv = make_tokens(512), make_kv(lay, 512)
    with ServerThread(config) as srv, Client(srv.address, "smollm2", lay, transport="stream",
                                             max_message_bytes=1 << 20) as c:
        assert c.put(tokens, kv) == 512
        back = np.stack([arr for _, arr in c.get_layers(tokens, as_numpy=True)])
        assert np.array_equal(back, kv)


def test_full_smollm2_shape_round_trips(client):
    c = client("smollm2-135m", SMOLLM2_LAYOUT)
    tokens, kv = make_tokens(600), make_kv(SMOLLM2_LAYOUT, 600)
    assert c.put(tokens, torch.from_numpy(kv)) == 512
    assert torch.equal(c.get(tokens), torch.from_numpy(kv[:, :, :, :512]))


def test_deadline_too_short_is_deadline_exceeded(client, layout):
    tokens, kv = make_tokens(1024), make_kv(SMOLLM2_LAYOUT, 1024)  # 24 MB
    assert client("big", SMOLLM2_LAYOUT).put(tokens, kv) == 1024
    # Streamed: 24 MB cannot cross the socket in 5 ms (the arena path might copy it).
    hurried = client("big", SMOLLM2_LAYOUT, timeout_s=0.005, transport="stream")
    with pytest.raises(DeadlineExceeded):
        hurried.get(tokens)
    with pytest.raises(DeadlineExceeded):
        client(timeout_s=1e-9).put(make_tokens(32), make_kv(layout, 32))
    assert client("big", SMOLLM2_LAYOUT).lookup(tokens) == 1024  # still serving


def test_position_free_chunk_round_trips_at_any_length(client, layout):
    c = client()
    tokens, kv = make_tokens(37), make_kv(layout, 37)
    assert not c.lookup_chunk(tokens)
    assert c.get_chunk(tokens) is None
    assert c.put_chunk(tokens, kv) is True
    assert c.put_chunk(tokens, kv) is False  # already stored
    assert c.lookup_chunk(tokens)
    assert np.array_equal(c.get_chunk(tokens, as_numpy=True), kv)
    assert c.lookup(tokens) == 0  # prefix keys are a different key space
    assert c.delete_chunk(tokens) and not c.lookup_chunk(tokens)


def test_delete_removes_every_chunk(client, layout):
    c = client()
    tokens = make_tokens(48)
    c.put(tokens, make_kv(layout, 48))
    assert c.delete(tokens) == 3
    assert c.lookup(tokens) == 0 and c.delete(tokens) == 0


def test_prefetch_and_stats_report_tiers(client, layout):
    c = client()
    tokens = make_tokens(48)
    c.put(tokens, make_kv(layout, 48))
    assert c.prefetch(tokens) == 48
    stats = c.stats()
    names = [t["name"] for t in stats["tiers"]]
    assert names[0] == "cpu" and "disk" in names
    assert stats["requests"] >= 3 and stats["version"]


def test_non_contiguous_tensor_round_trips(client, layout):
    c = client()
    kv = make_kv(layout, 32)
    strided = torch.from_numpy(np.ascontiguousarray(kv.swapaxes(3, 4))).transpose(3, 4)
    assert not strided.is_contiguous()
    assert c.put(make_tokens(32), strided) == 32
    assert np.array_equal(c.get(make_tokens(32), as_numpy=True), kv)


def test_failover_skips_dead_address(server, layout):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"  # closed below: nothing listens there
    with Client([dead, server.address], "m", layout, timeout_s=10) as c:
        tokens, kv = make_tokens(32), make_kv(layout, 32)
        assert c.put(tokens, kv) == 32
        assert np.array_equal(c.get(tokens, as_numpy=True), kv)
        assert list(c.get_layers(tokens))


def test_sixteen_concurrent_clients_get_exactly_what_they_put(client, layout):
    shared = make_tokens(64, seed=42)  # every sequence starts with the same 2 chunks
    shared_kv = make_kv(layout, 64, seed=42)
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            c = client()
            tokens = np.concatenate([shared[:32], make_tokens(32, seed=i)])
            kv = np.concatenate([shared_kv[:, :, :, :32], make_kv(layout, 32, seed=i)], axis=3)
            for _ in range(3):
                c.put(tokens, kv)
                assert np.array_equal(c.get(tokens, as_numpy=True), kv)
                assert c.lookup(tokens) == 64
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_get_assembler_rejects_a_bad_layer_checksum(layout):
    data = make_kv(layout, 16)[0].tobytes()
    msg = pb.GetResponse(chunk_index=0, layer=0, data=data, checksum_xxh3=123, num_chunks=1)
    asm = GetAssembler(layout, 16, [0], layer_major=True)
    with pytest.raises(Corrupt, match="checksum"):
        asm.add(frames.parse_get_response(msg.SerializeToString()))


def test_get_assembler_rejects_an_out_of_order_message(layout):
    from kvstore.codec.raw import encode_raw

    obj = encode_raw(make_kv(layout, 16), layout)
    asm = GetAssembler(layout, 16, list(range(layout.num_layers)), layer_major=False)
    with pytest.raises(Corrupt, match="expected"):
        asm.add(frames.parse_get_response(
            pb.GetResponse(chunk_index=1, data=obj, num_chunks=2).SerializeToString()))


def test_get_assembler_places_grouped_layer_messages_and_rejects_gaps(layout):
    kv = make_kv(layout, 48)  # 3 chunks of 16 tokens
    def layer_of(layer, first, n):
        data = np.ascontiguousarray(np.stack(
            [kv[layer, :, :, c * 16:(c + 1) * 16] for c in range(first, first + n)])).tobytes()
        return frames.parse_get_response(frames.get_response(
            chunk_index=first, layer=layer, data=data, checksum_xxh3=xxhash.xxh3_64_intdigest(data),
            num_chunks=3, num_chunks_in_data=n))

    asm = GetAssembler(layout, 16, list(range(layout.num_layers)), layer_major=True)
    for layer in range(layout.num_layers):
        assert asm.add(layer_of(layer, 0, 2)) is None
        assert asm.add(layer_of(layer, 2, 1)) == layer
    assert np.array_equal(asm.result(), kv)
    gap = GetAssembler(layout, 16, [0], layer_major=True)
    gap.add(layer_of(0, 0, 1))
    with pytest.raises(Corrupt, match="expected"):
        gap.add(layer_of(0, 2, 1))  # chunk 1 skipped
    chunk_major = GetAssembler(layout, 16, [0], layer_major=False)
    with pytest.raises(Corrupt, match="chunk-major"):
        chunk_major.add(layer_of(0, 0, 2))


def test_client_with_a_small_message_limit_gets_big_chunks_layer_by_layer(tmp_path):
    # The daemon would send whole 5.9 MB objects; this client accepts 1 MiB messages.
    from kvstore.server.app import ServerThread

    lay = SMOLLM2_LAYOUT
    tokens, kv = make_tokens(256), make_kv(lay, 256)
    with ServerThread(make_config(tmp_path / "d")) as srv:
        with Client(srv.address, "smollm2", lay, transport="stream",
                    max_message_bytes=1 << 20) as c:
            assert c.put(tokens, kv) == 256
            assert np.array_equal(c.get(tokens, as_numpy=True), kv)
            assert np.array_equal(c.get(tokens, layers=[3], as_numpy=True), kv[3:4])
