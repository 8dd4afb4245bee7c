"""Request bounds (server.max_request_tokens / max_request_chunks) and hashing off the loop."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest

from kvstore._proto import kvstore_pb2 as pb
from kvstore._proto import kvstore_pb2_grpc as pb_grpc
from kvstore.server.app import ServerThread
from tests.conftest import make_config


def _ns(chunk_tokens: int) -> pb.Namespace:
    return pb.Namespace(name="limits", layout=pb.Layout(
        num_layers=2, num_kv_heads=1, head_dim=8, dtype=pb.DTYPE_FLOAT16,
        chunk_tokens=chunk_tokens))


def _lookup(address: str, num_tokens: int, chunk_tokens: int) -> int:
    with grpc.insecure_channel(address, options=[
            ("grpc.max_send_message_length", 64 << 20)]) as channel:
        request = pb.LookupRequest(namespace=_ns(chunk_tokens),
                                   tokens_le_i32=np.arange(num_tokens, dtype="<i4").tobytes())
        return pb_grpc.KVStoreStub(channel).Lookup(request, timeout=60).num_tokens


@pytest.mark.parametrize("num_tokens", [8_000_000, 100_000])  # over max tokens / max chunks
def test_huge_request_with_one_token_chunks_is_refused_quickly(server, num_tokens):
    start = time.perf_counter()
    with pytest.raises(grpc.RpcError) as info:
        _lookup(server.address, num_tokens, chunk_tokens=1)
    elapsed_s = time.perf_counter() - start
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "server.max_request_" in info.value.details()
    assert elapsed_s < 5.0  # hashing 8M one-token chunks took ~9 s idle before the bound


def test_request_limits_come_from_the_config(tmp_path):
    config = make_config(tmp_path / "data", **{"server.max_request_tokens": 1000,
                                               "server.max_request_chunks": 10})
    with ServerThread(config) as server:
        assert _lookup(server.address, 1000, chunk_tokens=100) == 0  # 10 chunks: allowed
        for num_tokens, chunk_tokens in ((1001, 1000), (11, 1)):
            with pytest.raises(grpc.RpcError) as info:
                _lookup(server.address, num_tokens, chunk_tokens)
            assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT


def test_small_lookup_is_answered_while_a_large_request_hashes(tmp_path):
    config = make_config(tmp_path / "data", **{"server.max_request_chunks": 1 << 22})
    with ServerThread(config) as server:
        big_done: list[float] = []

        def big() -> None:
            _lookup(server.address, 1_500_000, chunk_tokens=1)  # ~1.5 s of hashing
            big_done.append(time.perf_counter())

        thread = threading.Thread(target=big)
        thread.start()
        time.sleep(0.3)  # the big request is being hashed now
        latencies = []
        for _ in range(3):
            start = time.perf_counter()
            assert _lookup(server.address, 64, chunk_tokens=16) == 0
            latencies.append(time.perf_counter() - start)
        small_done = time.perf_counter()
        thread.join(timeout=120)
        assert big_done and small_done < big_done[0], "the big request ended first: too small"
        assert max(latencies) < 0.5, latencies


def test_message_over_max_message_bytes_is_resource_exhausted(tmp_path):
    config = make_config(tmp_path / "data", **{"server.max_message_bytes": 1 << 20})
    with ServerThread(config) as server:
        with pytest.raises(grpc.RpcError) as info:
            _lookup(server.address, 300_000, chunk_tokens=256)  # 1.2 MB of token ids
        assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
