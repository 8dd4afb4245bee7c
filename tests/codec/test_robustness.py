"""Damaged, truncated and forged kvq objects raise Corrupt: never a crash, hang,
giant allocation, or a tensor of the wrong shape or with inf/nan."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvstore import codec
from kvstore.codec.format import HEADER_BYTES, compute_checksum, read_header
from kvstore.errors import Corrupt, KVStoreError
from kvstore.layout import KVLayout

from .conftest import synthetic_kv

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, chunk_tokens=24)
KV = synthetic_kv(2, 2, 24, 16, seed=5)
OBJECTS = {level: codec.encode(KV, LAYOUT, level) for level in ("near-lossless", "aggressive")}


def _reseal(data: bytearray) -> bytes:
    """Recompute the checksum, as a forger would."""
    if len(data) >= HEADER_BYTES:
        data[40:48] = struct.pack("<Q", compute_checksum(bytes(data)))
    return bytes(data)


def _decode_or_corrupt(data: bytes) -> torch.Tensor | None:
    """Decode whole and layer 0; a success must be well-formed and finite."""
    try:
        out = codec.decode(data)
        layer = codec.decode_layer(data, 0)
    except Corrupt:
        return None
    header = read_header(data)
    assert tuple(out.shape) == (header.num_layers, 2, header.num_kv_heads, header.num_tokens,
                                header.head_dim)
    assert torch.equal(layer, out[0])
    assert torch.isfinite(out.float()).all()
    return out


@pytest.mark.parametrize("level", list(OBJECTS))
def test_every_truncation_raises_corrupt(level: str) -> None:
    data = OBJECTS[level]
    for n in list(range(0, HEADER_BYTES + 8)) + list(range(HEADER_BYTES + 8, len(data), 13)):
        with pytest.raises(Corrupt):
            codec.decode(data[:n])


@pytest.mark.parametrize("level", list(OBJECTS))
def test_every_single_bit_flip_raises_corrupt(level: str) -> None:
    data = OBJECTS[level]
    for pos in range(0, len(data), 3):
        bad = bytearray(data)
        bad[pos] ^= 1 << (pos % 8)
        with pytest.raises(Corrupt):
            codec.decode(bytes(bad))


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(0, 7)),
    st.tuples(st.just("set"), st.integers(0, 10**6), st.integers(0, 255)),
    st.tuples(st.just("cut"), st.integers(0, 10**6), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.integers(0, 255)),
)


def _mutate(data: bytes, ops: list[tuple[str, int, int]]) -> bytearray:
    buf = bytearray(data)
    for op, pos, val in ops:
        pos %= max(len(buf), 1)
        if op == "flip" and buf:
            buf[pos] ^= 1 << val
        elif op == "set" and buf:
            buf[pos] = val
        elif op == "cut":
            del buf[pos:]
        elif op == "insert":
            buf.insert(pos, val)
    return buf


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(level=st.sampled_from(list(OBJECTS)), ops=st.lists(mutation, min_size=1, max_size=4))
def test_mutated_objects_raise_corrupt(level: str, ops: list[tuple[str, int, int]]) -> None:
    data = OBJECTS[level]
    bad = bytes(_mutate(data, ops))
    if bad == data:
        return
    with pytest.raises(Corrupt):
        codec.decode(bad)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(level=st.sampled_from(list(OBJECTS)), ops=st.lists(mutation, min_size=1, max_size=4))
def test_forged_objects_with_valid_checksum_never_crash(level: str,
                                                        ops: list[tuple[str, int, int]]) -> None:
    bad = _reseal(_mutate(OBJECTS[level], ops))
    try:
        _decode_or_corrupt(bad)
    except KVStoreError as e:  # e.g. InvalidArgument for a forged layer count
        assert isinstance(e, Corrupt) or "layer" in str(e)


def test_forged_payload_word_is_detected_by_lane_check() -> None:
    data = OBJECTS["aggressive"]
    caught = 0
    tail = range(len(data) - 200, len(data), 2)  # words of the last section's lanes
    for pos in tail:
        bad = bytearray(data)
        bad[pos] ^= 0x5A
        caught += _decode_or_corrupt(_reseal(bad)) is None
    assert caught >= 0.9 * len(tail)


def test_forged_token_count_cannot_force_a_giant_allocation() -> None:
    bad = bytearray(OBJECTS["aggressive"])
    bad[16:20] = struct.pack("<I", 60_000)  # num_tokens
    with pytest.raises(Corrupt):
        codec.decode(_reseal(bad))


def test_forged_scale_base_cannot_produce_inf() -> None:
    data = OBJECTS["aggressive"]
    obj = codec.parse_object(data)
    start = len(data) - sum(s.nbytes for s in obj.sections)
    bad = bytearray(data)
    bad[start + 4 : start + 8] = struct.pack("<f", 1e30)  # base of layer 0 keys
    with pytest.raises(Corrupt):
        codec.decode(_reseal(bad))
    assert np.isfinite(KV).all()
