"""The public codec API: ``encode``, ``decode``, ``decode_many``, ``decode_layer`` over
raw and kvq objects.

Loaded on first use by ``kvstore.codec`` (it imports torch and numba).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvstore.codec import kvq
from kvstore.codec.calibrate import CalibrationTable, load_table
from kvstore.codec.format import CodecId, read_header
from kvstore.codec.levels import level_by_name
from kvstore.codec.raw import check_kv_array, decode_raw, encode_raw
from kvstore.errors import InvalidArgument
from kvstore.layout import KVLayout
from kvstore.models.dtypes import TORCH_DTYPES


def _as_storage(kv: Any, layout: KVLayout) -> np.ndarray:
    """A tensor or array in the layout's dtype -> numpy storage array (bf16 as uint16)."""
    if isinstance(kv, torch.Tensor):
        if kv.dtype != TORCH_DTYPES[layout.dtype]:
            raise InvalidArgument(f"kv dtype is {kv.dtype}, layout wants {layout.dtype}")
        t = kv.detach().cpu().contiguous()
        kv = t.view(torch.int16).numpy().view(np.uint16) if layout.dtype == "bfloat16" \
            else t.numpy()
    if not isinstance(kv, np.ndarray):
        raise InvalidArgument(f"kv must be a torch.Tensor or numpy array, got {type(kv).__name__}")
    check_kv_array(kv, layout)
    return kv


def encode(kv: Any, layout: KVLayout, level: str = "balanced", *,
           table: CalibrationTable | str | Path | None = None, flags: int = 0) -> bytes:
    """Encode one chunk ``[layers, 2, kv_heads, tokens, head_dim]`` into a KVC1 object.

    Args:
        kv: torch tensor or numpy array in ``layout.dtype`` (bf16 arrays as uint16 bits).
        layout: the model's KV layout; the token count may differ from chunk_tokens.
        level: a name from ``LEVELS`` ("raw" is bit-exact).
        table: a calibration table (or its file) choosing bins per layer group;
            None uses the level's uniform defaults.
        flags: object flags (format.FLAG_POSITION_FREE).

    Raises:
        InvalidArgument: wrong shape/dtype, unknown level, non-finite values.
    """
    lv = level_by_name(level)
    arr = _as_storage(kv, layout)
    if lv.level_id == 0:
        return encode_raw(arr, layout, flags=flags)
    if table is not None and not isinstance(table, CalibrationTable):
        table = load_table(table)
    if table is not None:
        table.check_layout(layout)
    return kvq.encode_kvq(arr, layout, lv, table, flags=flags)


def _to_torch(arr: np.ndarray, dtype: str) -> torch.Tensor:
    t = torch.from_numpy(np.array(arr, copy=True) if not arr.flags.writeable else arr)
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


def _decode_layers(data: bytes | memoryview, layers: range | None, device: Any) -> torch.Tensor:
    header = read_header(data)
    if header.codec_id == CodecId.RAW:
        _, arr = decode_raw(data)
        arr = arr if layers is None else arr[layers.start : layers.stop]
        return _to_torch(arr, header.dtype).to(device or "cpu")
    obj = kvq.parse_kvq(data)
    todo = range(header.num_layers) if layers is None else layers
    if device is not None and torch.device(device).type != "cpu":
        from kvstore.codec.gpu import decode_on_device

        return decode_on_device(obj, todo, device)
    out = kvq.from_float32(kvq.decode_layers_f32(obj, todo), header.dtype)
    return _to_torch(out, header.dtype)


def decode(data: bytes | memoryview, *, device: Any = None) -> torch.Tensor:
    """Decode an object to ``[layers, 2, kv_heads, tokens, head_dim]`` in its dtype.

    Needs nothing but the bytes. ``device="cuda"`` decodes kvq objects with the
    Triton kernel; otherwise the numba CPU decoder runs.

    Raises:
        Corrupt: truncated, damaged or forged bytes.
    """
    return _decode_layers(data, None, device)


def decode_many(objects: Sequence[bytes | memoryview], *, device: Any = None
                ) -> list[torch.Tensor]:
    """Decode several objects; one ``[layers, 2, kv_heads, tokens, head_dim]`` each.

    On a CUDA device every kvq object of the call is decoded by one batched set of
    kernel launches (``codec.gpu.decode_many_on_device``): a single object leaves
    most of an H100 idle. On the CPU this is ``decode`` per object.

    Raises:
        Corrupt: any object is truncated, damaged or forged (nothing is returned).
    """
    if device is None or torch.device(device).type == "cpu":
        return [decode(data) for data in objects]
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgument(f"device={device!r} asks for a CUDA decode, but this torch has "
                              "no usable CUDA device (torch.cuda.is_available() is False); "
                              "pass device=None to decode on the CPU")
    return _decode_batched(objects, device)


def _decode_batched(objects: Sequence[bytes | memoryview], device: Any) -> list[torch.Tensor]:
    """decode_many's device path (tests run it on the CPU under TRITON_INTERPRET=1)."""
    from kvstore.codec.gpu import decode_many_on_device

    is_raw = [read_header(data).codec_id == CodecId.RAW for data in objects]
    out = [decode(data, device=device) if raw else None
           for data, raw in zip(objects, is_raw, strict=True)]
    coded = [i for i, raw in enumerate(is_raw) if not raw]
    parsed = [kvq.parse_kvq(objects[i]) for i in coded]
    for i, tensor in zip(coded, decode_many_on_device(parsed, device), strict=True):
        out[i] = tensor
    return out  # type: ignore[return-value]


def decode_layer(data: bytes | memoryview, layer: int, *, device: Any = None) -> torch.Tensor:
    """Decode one layer, ``[2, kv_heads, tokens, head_dim]``, touching only its sections."""
    header = read_header(data)
    if not 0 <= layer < header.num_layers:
        raise InvalidArgument(f"layer {layer} out of range, object has {header.num_layers}")
    return _decode_layers(data, range(layer, layer + 1), device)[0]
