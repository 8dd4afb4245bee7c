"""The `raw` codec: fp16/bf16/fp32 bytes, one section per (layer, K|V), no compression.

The tensor is held as a numpy array; bfloat16, which numpy lacks, travels as its
uint16 bit pattern with the dtype name carried beside it.
"""

from __future__ import annotations

import numpy as np

from kvstore.codec.format import (
    HEADER_BYTES,
    CodecId,
    ObjectHeader,
    pack_object,
    read_header,
    verify_object,
)
from kvstore.errors import Corrupt, InvalidArgument
from kvstore.layout import DTYPE_ITEMSIZE, KVLayout

# numpy storage dtype for each canonical dtype name (bf16 as raw bits).
NUMPY_STORAGE: dict[str, np.dtype] = {
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
    "float32": np.dtype("<f4"),
}


def check_kv_array(kv: np.ndarray, layout: KVLayout, num_tokens: int | None = None) -> None:
    """Raise InvalidArgument unless ``kv`` is ``layout.shape(num_tokens)`` in layout's dtype."""
    tokens = kv.shape[3] if (num_tokens is None and kv.ndim == 5) else num_tokens
    expected = layout.shape(tokens if tokens is not None else layout.chunk_tokens)
    if kv.ndim != 5:
        raise InvalidArgument(
            f"kv must have rank 5 [layers, 2, kv_heads, tokens, head_dim], got shape "
            f"{tuple(kv.shape)}"
        )
    if tuple(kv.shape) != expected:
        raise InvalidArgument(f"kv has shape {tuple(kv.shape)}, layout wants {expected}")
    if kv.dtype != NUMPY_STORAGE[layout.dtype]:
        raise InvalidArgument(
            f"kv storage dtype is {kv.dtype}, layout dtype {layout.dtype} wants "
            f"{NUMPY_STORAGE[layout.dtype]}"
        )


def encode_raw(kv: np.ndarray, layout: KVLayout, *, flags: int = 0) -> bytes:
    """Pack ``kv`` (``[layers, 2, heads, tokens, dim]``) into a raw KVC1 object."""
    check_kv_array(kv, layout)
    kv = np.ascontiguousarray(kv)
    flat = memoryview(kv.reshape(-1)).cast("B")
    section = flat.nbytes // (2 * layout.num_layers)
    sections = [flat[i * section : (i + 1) * section] for i in range(2 * layout.num_layers)]
    return pack_object(
        codec_id=CodecId.RAW, codec_level=0, dtype=layout.dtype,
        num_layers=layout.num_layers, num_kv_heads=layout.num_kv_heads,
        head_dim=layout.head_dim, num_tokens=kv.shape[3], sections=sections, flags=flags,
    )


def _check_raw_header(header: ObjectHeader) -> int:
    if header.codec_id != CodecId.RAW:
        raise InvalidArgument(f"object has codec id {header.codec_id}, expected raw (0)")
    section = header.num_kv_heads * header.num_tokens * header.head_dim
    section *= DTYPE_ITEMSIZE[header.dtype]
    if header.num_sections != 2 * header.num_layers or header.meta_bytes != 0:
        raise Corrupt(f"raw object has {header.num_sections} sections, expected "
                      f"{2 * header.num_layers}")
    if header.payload_bytes != 4 * header.num_sections + section * header.num_sections:
        raise Corrupt(f"raw payload is {header.payload_bytes} bytes, layout implies "
                      f"{4 * header.num_sections + section * header.num_sections}")
    return section


def raw_payload(
    data: bytes | memoryview, *, verify: bool = True
) -> tuple[ObjectHeader, memoryview]:
    """The contiguous tensor bytes of a raw object, ``[layers, 2, heads, tokens, dim]``."""
    header = verify_object(data) if verify else read_header(data)
    _check_raw_header(header)
    # Raw sections are contiguous right after the table (no meta), in canonical order.
    return header, memoryview(data)[HEADER_BYTES + 4 * header.num_sections :]


def decode_raw(data: bytes | memoryview, *, verify: bool = True) -> tuple[ObjectHeader, np.ndarray]:
    """Decode a raw object to a read-only numpy array in canonical order."""
    header, payload = raw_payload(data, verify=verify)
    arr = np.frombuffer(payload, dtype=NUMPY_STORAGE[header.dtype])
    shape = (header.num_layers, 2, header.num_kv_heads, header.num_tokens, header.head_dim)
    return header, arr.reshape(shape)


def raw_layer_bytes(data: bytes | memoryview, layer: int, *, verify: bool = False) -> memoryview:
    """K and V sections of one layer of a raw object, ``[2, heads, tokens, dim]``."""
    header, payload = raw_payload(data, verify=verify)
    if not 0 <= layer < header.num_layers:
        raise InvalidArgument(f"layer {layer} out of range, object has {header.num_layers}")
    per_layer = payload.nbytes // header.num_layers
    return payload[layer * per_layer : (layer + 1) * per_layer]
