"""Every RPC of the daemon, fed generated messages and raw bytes: a clear status, always.

A real server on port 0 (with a bearer token, so the auth path is in play) gets
protobuf requests built by hypothesis from the schema, and raw bytes (random, and
serialised messages with bytes flipped) through a generic channel. Each call must
end within its deadline with a status from ``ALLOWED`` (never UNKNOWN, INTERNAL or
DEADLINE_EXCEEDED) and must not make the process allocate more than
``PEAK_BYTES_PER_CALL`` for a request of a few KiB. Bounded: ``max_examples`` per
test keeps the package under a minute on two cores.
"""

from __future__ import annotations

import tracemalloc
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from kvstore._proto import kvstore_pb2 as pb
from tests.fuzz.conftest import METADATA
from tests.fuzz.strategies import message

SERVICE = pb.DESCRIPTOR.services_by_name["KVStore"]
METHODS = {m.name: m for m in SERVICE.methods}
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DATA_LOSS,
           grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
CALL_TIMEOUT_S = 10.0  # a call still running after this is a hang
PEAK_BYTES_PER_CALL = 64 << 20  # requests are a few KiB; the daemon's limits are far below
FUZZ = settings(max_examples=20, deadline=10_000, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large])
GARBAGE = b"\xff\xff\xff\xff"  # a varint that never ends: no message decodes from it


def _same(data: bytes) -> bytes:
    return data


def call_raw(channel: grpc.Channel, method: str, payload: list[bytes],
             metadata: Any = METADATA) -> tuple[grpc.StatusCode, str]:
    """Send serialised request(s) to ``method``; returns the status and its details."""
    desc, path = METHODS[method], f"/{SERVICE.full_name}/{method}"
    kw = {"request_serializer": _same, "response_deserializer": _same}
    try:
        if desc.client_streaming:
            channel.stream_unary(path, **kw)(iter(payload), timeout=CALL_TIMEOUT_S,
                                             metadata=metadata)
        elif desc.server_streaming:
            for _ in channel.unary_stream(path, **kw)(payload[0], timeout=CALL_TIMEOUT_S,
                                                      metadata=metadata):
                pass
        else:
            channel.unary_unary(path, **kw)(payload[0], timeout=CALL_TIMEOUT_S,
                                            metadata=metadata)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def check_call(channel: grpc.Channel, method: str, payload: list[bytes]) -> grpc.StatusCode:
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    code, details = call_raw(channel, method, payload)
    peak = tracemalloc.get_traced_memory()[1] - base
    assert code in ALLOWED, f"{method} answered {code.name}: {details}"
    assert peak < PEAK_BYTES_PER_CALL, f"{method} allocated {peak} bytes for a " \
        f"{sum(map(len, payload))}-byte request"
    return code


def _requests(method: str) -> st.SearchStrategy[list[bytes]]:
    msgs = message(METHODS[method].input_type)
    size = (1, 4) if METHODS[method].client_streaming else (1, 1)
    return st.lists(msgs.map(lambda m: m.SerializeToString()), min_size=size[0],
                    max_size=size[1])


def _flipped(data: bytes, draw: Any) -> bytes:
    if not data:
        return draw(st.binary(max_size=64))
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, len(out) - 1))
        out[pos] = draw(st.integers(0, 255))
    return bytes(out[: draw(st.integers(0, len(out)))] if draw(st.booleans()) else out)


@st.composite
def _raw(draw: Any, method: str) -> list[bytes]:
    """Random bytes, or valid requests with bytes overwritten and maybe cut short."""
    valid = draw(_requests(method))
    if draw(st.booleans()):
        return [draw(st.binary(max_size=512)) for _ in valid]
    return [_flipped(v, draw) for v in valid]


@pytest.mark.parametrize("method", sorted(METHODS))
@FUZZ
@given(data=st.data())
def test_rpc_answers_generated_requests_with_a_clear_status(channel, method, data):
    check_call(channel, method, data.draw(_requests(method)))


@pytest.mark.parametrize("method", sorted(METHODS))
@settings(FUZZ, phases=[Phase.explicit, Phase.reuse, Phase.generate])  # no shrinking
@given(data=st.data())
def test_rpc_answers_raw_bytes_with_a_clear_status(channel, method, data):
    check_call(channel, method, data.draw(_raw(method)))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_undecodable_request_is_invalid_argument(channel, method):
    code, details = call_raw(channel, method, [GARBAGE])
    assert code == grpc.StatusCode.INVALID_ARGUMENT, f"{code.name}: {details}"


@pytest.mark.parametrize("method", sorted(METHODS))
def test_undecodable_request_without_token_is_unauthenticated(channel, method):
    code, details = call_raw(channel, method, [GARBAGE], metadata=())
    assert code == grpc.StatusCode.UNAUTHENTICATED, f"{code.name}: {details}"


@pytest.mark.parametrize("method", sorted(METHODS))
def test_empty_request_without_token_is_unauthenticated(channel, method):
    code, details = call_raw(channel, method, [b""], metadata=())
    assert code == grpc.StatusCode.UNAUTHENTICATED, f"{code.name}: {details}"
