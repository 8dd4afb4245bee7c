"""The KVC1 object format with the raw codec: round trips and every kind of damage."""

from __future__ import annotations

import numpy as np
import pytest

from kvstore.codec.format import HEADER_BYTES, parse_object, read_header, verify_object
from kvstore.codec.raw import decode_raw, encode_raw, raw_layer_bytes
from kvstore.errors import Corrupt, InvalidArgument
from kvstore.layout import KVLayout

LAYOUT = KVLayout(num_layers=3, num_kv_heads=2, head_dim=8, chunk_tokens=4)


def _kv(layout: KVLayout = LAYOUT, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal(layout.chunk_shape).astype(np.float16)


def test_raw_round_trip_bit_exact_for_each_dtype() -> None:
    rng = np.random.default_rng(1)
    for dtype, np_dtype in (("float16", np.float16), ("float32", np.float32)):
        layout = KVLayout(3, 2, 8, dtype=dtype, chunk_tokens=4)
        kv = rng.standard_normal(layout.chunk_shape).astype(np_dtype)
        header, out = decode_raw(encode_raw(kv, layout))
        assert header.dtype == dtype and out.tobytes() == kv.tobytes()
    bf16 = KVLayout(3, 2, 8, dtype="bfloat16", chunk_tokens=4)
    bits = rng.integers(0, 2**16, size=bf16.chunk_shape, dtype=np.uint16)
    assert decode_raw(encode_raw(bits, bf16))[1].tobytes() == bits.tobytes()


def test_header_records_layout_and_sections_per_layer_kv() -> None:
    obj = encode_raw(_kv(), LAYOUT)
    header = verify_object(obj)
    assert (header.num_layers, header.num_kv_heads, header.head_dim, header.num_tokens) == (
        3, 2, 8, 4)
    parsed = parse_object(obj)
    assert len(parsed.sections) == 6
    assert all(s.nbytes == LAYOUT.section_bytes for s in parsed.sections)


def test_raw_layer_bytes_is_that_layers_k_and_v() -> None:
    kv = _kv()
    obj = encode_raw(kv, LAYOUT)
    layer1 = np.frombuffer(raw_layer_bytes(obj, 1), dtype=np.float16).reshape(2, 2, 4, 8)
    assert np.array_equal(layer1, kv[1])
    with pytest.raises(InvalidArgument, match="layer 3 out of range"):
        raw_layer_bytes(obj, 3)


@pytest.mark.parametrize("position", [0, 5, 12, 20, 33, 41, HEADER_BYTES + 1, -1])
def test_any_flipped_bit_is_corrupt(position: int) -> None:
    obj = bytearray(encode_raw(_kv(), LAYOUT))
    obj[position] ^= 0x10
    with pytest.raises(Corrupt):
        decode_raw(bytes(obj))


@pytest.mark.parametrize("length", [0, 10, HEADER_BYTES - 1, HEADER_BYTES, HEADER_BYTES + 30])
def test_truncated_object_is_corrupt(length: int) -> None:
    obj = encode_raw(_kv(), LAYOUT)
    with pytest.raises(Corrupt):
        decode_raw(obj[:length])


def test_extra_trailing_bytes_are_corrupt() -> None:
    with pytest.raises(Corrupt, match="header says"):
        read_header(encode_raw(_kv(), LAYOUT) + b"\0")


def test_encode_rejects_wrong_shape_and_dtype() -> None:
    with pytest.raises(InvalidArgument, match="layout wants"):
        encode_raw(np.zeros((3, 2, 2, 4, 7), np.float16), LAYOUT)
    with pytest.raises(InvalidArgument, match="rank 5"):
        encode_raw(np.zeros((3, 2, 2, 4), np.float16), LAYOUT)
    with pytest.raises(InvalidArgument, match="dtype"):
        encode_raw(np.zeros(LAYOUT.chunk_shape, np.float32), LAYOUT)
