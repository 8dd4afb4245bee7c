"""Garbage and out-of-range requests get INVALID_ARGUMENT (UNAUTHENTICATED first), never
UNKNOWN/INTERNAL, and the log gets rate-limited one-line warnings without tracebacks."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor

from kvstore._proto import kvstore_pb2 as pb
from kvstore.server.app import ServerThread
from tests.conftest import make_config

SERVICE = pb.DESCRIPTOR.services_by_name["KVStore"]
GARBAGE = [b"\xff\xff\xff", b"\x0a\x05abc", b"\x08", bytes(range(256)) * 3,
           b"\x0a\x80\x80\x80\x80\x10"]  # corrupt varints, short length, overlong field


def _call(channel: grpc.Channel, method: Any, payload: Any, token: str | None
          ) -> grpc.StatusCode:
    """Send ``payload`` (raw bytes, or a message) as ``method``'s request; the status."""
    path = f"/{SERVICE.full_name}/{method.name}"
    raw = payload if isinstance(payload, bytes) else payload.SerializeToString()
    md = [("authorization", f"Bearer {token}")] if token else None
    try:
        if method.client_streaming:
            channel.stream_unary(path)(iter([raw]), timeout=10, metadata=md)
        elif method.server_streaming:
            list(channel.unary_stream(path)(raw, timeout=10, metadata=md))
        else:
            channel.unary_unary(path)(raw, timeout=10, metadata=md)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


@pytest.fixture
def authed_server(tmp_path) -> Iterator[ServerThread]:
    config = make_config(tmp_path / "data", **{"server.tokens": {"good-token": "tenant-a"}})
    with ServerThread(config) as server:
        yield server


def test_garbage_bytes_are_invalid_argument_on_every_method(server, caplog):
    caplog.set_level(logging.WARNING)
    with grpc.insecure_channel(server.address) as channel:
        codes = {(m.name, g[:4]): _call(channel, m, g, None)
                 for m in SERVICE.methods for g in GARBAGE}
    wrong = {k: c for k, c in codes.items() if c is not grpc.StatusCode.INVALID_ARGUMENT}
    assert wrong == {}
    # One line (the first refusal), no traceback, nothing from gRPC's own handler.
    assert [r.exc_info for r in caplog.records if r.exc_info] == []
    refusals = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 1 and "\n" not in refusals[0].getMessage()
    assert not any("Unexpected" in r.getMessage() for r in caplog.records)


def test_garbage_bytes_without_a_valid_token_are_unauthenticated(authed_server):
    with grpc.insecure_channel(authed_server.address) as channel:
        for method in SERVICE.methods:
            for token in (None, "wrong-token"):
                assert _call(channel, method, GARBAGE[0], token) is \
                    grpc.StatusCode.UNAUTHENTICATED, (method.name, token)
            assert _call(channel, method, GARBAGE[0], "good-token") is \
                grpc.StatusCode.INVALID_ARGUMENT, method.name


def _random_value(field: FieldDescriptor, rng: random.Random, depth: int) -> Any:
    t = field.type
    if t == FieldDescriptor.TYPE_MESSAGE:
        return _random_message(field.message_type._concrete_class, rng, depth + 1)
    if t == FieldDescriptor.TYPE_BYTES:
        return rng.choice([b"", rng.randbytes(rng.choice([1, 3, 4, 8, 64, 4096]))])
    if t == FieldDescriptor.TYPE_STRING:
        return rng.choice(["", "x", "kvq", "é" * 3])
    if t == FieldDescriptor.TYPE_BOOL:
        return rng.random() < 0.5
    if t == FieldDescriptor.TYPE_ENUM:
        return rng.choice([0, 1, 2, 3, 7, 2**31 - 1])
    unsigned = t in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64)
    wide = t in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_INT64)
    top = (1 << (64 if wide else 32)) - 1 if unsigned else (1 << (63 if wide else 31)) - 1
    return rng.choice([0, 1, 2, 3, 8, 255, 4096, top])


def _is_repeated(field: FieldDescriptor) -> bool:
    if hasattr(field, "is_repeated"):  # protobuf >= 5.29 deprecates ``label``
        return bool(field.is_repeated)
    return field.label == FieldDescriptor.LABEL_REPEATED


def _random_message(cls: Any, rng: random.Random, depth: int = 0) -> Any:
    msg = cls()
    if depth > 3:
        return msg
    for field in cls.DESCRIPTOR.fields:
        if rng.random() < 0.25:
            continue
        if _is_repeated(field):
            values = [_random_value(field, rng, depth) for _ in range(rng.randint(0, 3))]
            getattr(msg, field.name).extend(values)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            getattr(msg, field.name).CopyFrom(_random_value(field, rng, depth))
        else:
            setattr(msg, field.name, _random_value(field, rng, depth))
    return msg


def test_random_well_formed_requests_never_fail_as_internal(server):
    rng = random.Random(17)
    bad = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
    seen: list[tuple[str, str]] = []
    with grpc.insecure_channel(server.address) as channel:
        for _ in range(25):
            for method in SERVICE.methods:
                message = _random_message(method.input_type._concrete_class, rng)
                if _call(channel, method, message, None) in bad:
                    seen.append((method.name, str(message)[:200]))
    assert seen == []


def test_get_order_out_of_range_is_invalid_argument(server, layout):
    from tests.server.test_service import _ns

    with grpc.insecure_channel(server.address) as channel:
        request = pb.GetRequest(namespace=_ns(layout), tokens_le_i32=b"\0" * 64, order=7)
        assert _call(channel, SERVICE.methods_by_name["Get"], request, None) is \
            grpc.StatusCode.INVALID_ARGUMENT


def test_garbage_after_a_valid_put_header_is_invalid_argument(server, layout):
    from tests.server.test_service import _ns

    header = pb.PutRequest(header=pb.PutHeader(namespace=_ns(layout),
                                               tokens_le_i32=b"\0" * 4 * 64)).SerializeToString()
    with grpc.insecure_channel(server.address) as channel:
        put = channel.stream_unary(f"/{SERVICE.full_name}/Put")
        with pytest.raises(grpc.RpcError) as info:
            put(iter([header, GARBAGE[0]]), timeout=10)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "do not parse" in info.value.details()
