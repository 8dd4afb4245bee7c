"""The ``kvq`` codec (CodecId.KVQ): CacheGen-style quantisation + lane-parallel rANS.

An object is a KVC1 object (format.py) with one section per (layer, K|V) in
canonical order (section.py) and a 16-byte meta area:

    offset size field
    0      4    magic      b"KVQ1"
    4      4    reserved   0
    8      8    table_id   u64 id of the calibration table that chose the bins; 0 = none

Bins travel in every section, so decoding never needs the calibration table; the id
is provenance (which table to re-calibrate, which model it was tuned for).
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

import numpy as np

from kvstore.codec import section as sec
from kvstore.codec.format import CodecId, ObjectHeader, ParsedObject, pack_object, parse_object
from kvstore.codec.halfconv import from_float32, to_float32
from kvstore.codec.levels import Level, level_by_id
from kvstore.errors import Corrupt, InvalidArgument
from kvstore.layout import KVLayout

if TYPE_CHECKING:
    from kvstore.codec.calibrate import CalibrationTable

_META = struct.Struct("<4sIQ")
META_MAGIC = b"KVQ1"
META_BYTES = 16
assert _META.size == META_BYTES
# A forged header must not make us allocate gigabytes: legitimate objects carry at
# least 1 byte per (head, token) of values side info, so they expand < 256x.
_MAX_EXPANSION = 1024
_MAX_DECODED_BYTES = 1 << 32


def value_kind(head_dim: int) -> int:
    return sec.KIND_VALUES if head_dim & (head_dim - 1) == 0 else sec.KIND_VALUES_PLAIN


def encode_kvq(kv: np.ndarray, layout: KVLayout, level: Level,
               table: CalibrationTable | None = None, *, flags: int = 0) -> bytes:
    """Encode a storage array ``[layers, 2, heads, tokens, dim]`` at a kvq level."""
    num_layers, _, heads, tokens, dim = kv.shape
    sections: list[bytes] = []
    vkind = value_kind(dim)
    x = to_float32(kv, layout.dtype)
    if not np.isfinite(x).all():
        raise InvalidArgument("kv holds inf or nan; the codec stores finite values only")
    for layer in range(num_layers):
        for kv_index, kind in ((0, sec.KIND_KEYS), (1, vkind)):
            bins = table.bins(level.name, layer, kv_index) if table else (
                level.key_bins if kv_index == 0 else level.value_bins)
            weights = table.key_weights_of(layer) if table and kv_index == 0 else None
            sections.append(sec.encode_section(x[layer, kv_index], kind, bins, weights))
    meta = _META.pack(META_MAGIC, 0, table.table_id if table else 0)
    return pack_object(
        codec_id=CodecId.KVQ, codec_level=level.level_id, dtype=layout.dtype,
        num_layers=num_layers, num_kv_heads=heads, head_dim=dim, num_tokens=tokens,
        sections=sections, meta=meta, flags=flags,
    )


def parse_kvq(data: bytes | memoryview, *, verify: bool = True) -> ParsedObject:
    """Verify and split a kvq object; raises Corrupt on anything inconsistent."""
    obj = parse_object(data, verify=verify)
    h = obj.header
    if h.codec_id != CodecId.KVQ:
        raise InvalidArgument(f"object has codec id {h.codec_id}, expected kvq ({CodecId.KVQ})")
    if level_by_id(h.codec_level) is None:
        raise Corrupt(f"unknown kvq level {h.codec_level}")
    if h.num_sections != 2 * h.num_layers or h.meta_bytes != META_BYTES:
        raise Corrupt(f"kvq object has {h.num_sections} sections and {h.meta_bytes} meta "
                      f"bytes, expected {2 * h.num_layers} and {META_BYTES}")
    magic, reserved, _table_id = _META.unpack_from(obj.meta)
    if magic != META_MAGIC or reserved:
        raise Corrupt(f"bad kvq meta magic {bytes(magic)!r}")
    decoded = decoded_bytes(h)
    if decoded > _MAX_DECODED_BYTES or decoded > _MAX_EXPANSION * memoryview(data).nbytes:
        raise Corrupt(f"header claims {decoded} decoded bytes from a "
                      f"{memoryview(data).nbytes}-byte object")
    if h.num_tokens > sec.MAX_TOKENS:
        raise Corrupt(f"kvq object claims {h.num_tokens} tokens, at most {sec.MAX_TOKENS}")
    return obj


def decoded_bytes(h: ObjectHeader) -> int:
    itemsize = 4 if h.dtype == "float32" else 2
    return h.num_layers * 2 * h.num_kv_heads * h.num_tokens * h.head_dim * itemsize


def table_id_of(obj: ParsedObject) -> int | None:
    """The calibration table id an object names, or None."""
    table_id = _META.unpack_from(obj.meta)[2]
    return table_id or None


_DTYPE_LIMIT = {"float16": 65519.0, "bfloat16": 3.38e38, "float32": 3.4e38}


def decode_layers_f32(obj: ParsedObject, layers: range) -> np.ndarray:
    """Decode the given layers to float32 ``[len(layers), 2, heads, tokens, dim]``.

    Raises:
        Corrupt: a damaged section, or values beyond the header's dtype (a forged
            object with a valid checksum must not decode to inf).
    """
    h = obj.header
    out = np.empty((len(layers), 2, h.num_kv_heads, h.num_tokens, h.head_dim), np.float32)
    vkind = value_kind(h.head_dim)
    peak = 0.0
    for i, layer in enumerate(layers):
        for kv_index, kind in ((0, sec.KIND_KEYS), (1, vkind)):
            peak = max(peak, sec.decode_section(obj.sections[2 * layer + kv_index], kind,
                                                h.num_kv_heads, h.num_tokens, h.head_dim,
                                                out[i, kv_index]))
    if peak > _DTYPE_LIMIT[h.dtype]:
        raise Corrupt(f"decoded values reach {peak:g}, beyond {h.dtype}: the object is forged")
    return out


def decode_kvq(data: bytes | memoryview, *, verify: bool = True
               ) -> tuple[ObjectHeader, np.ndarray]:
    """Decode a whole kvq object to a storage array in the header's dtype."""
    obj = parse_kvq(data, verify=verify)
    out = decode_layers_f32(obj, range(obj.header.num_layers))
    return obj.header, from_float32(out, obj.header.dtype)


def decode_kvq_layer(data: bytes | memoryview, layer: int, *, verify: bool = True
                     ) -> tuple[ObjectHeader, np.ndarray]:
    """Decode one layer, ``[2, heads, tokens, dim]``, in the header's dtype."""
    obj = parse_kvq(data, verify=verify)
    if not 0 <= layer < obj.header.num_layers:
        raise InvalidArgument(f"layer {layer} out of range, object has {obj.header.num_layers}")
    out = decode_layers_f32(obj, range(layer, layer + 1))[0]
    return obj.header, from_float32(out, obj.header.dtype)
