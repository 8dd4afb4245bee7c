"""Codecs and the KVC1 object format (DESIGN §3).

Importing this package is cheap: ``encode``/``decode``/``decode_layer`` load the
compressing codecs (torch, numba) on first use.
"""

from typing import Any

from kvstore.codec.format import (
    HEADER_BYTES,
    CodecId,
    ObjectHeader,
    parse_object,
    read_header,
    verify_object,
)
from kvstore.codec.levels import DEFAULT_LEVEL, LEVELS, Level
from kvstore.codec.raw import decode_raw, encode_raw


def encode(kv: Any, layout: Any, level: str = DEFAULT_LEVEL, **kwargs: Any) -> bytes:
    """Encode a chunk at a named level; see ``kvstore.codec.api.encode``."""
    from kvstore.codec.api import encode as _encode

    return _encode(kv, layout, level, **kwargs)


def decode(data: bytes | memoryview, **kwargs: Any) -> Any:
    """Decode an object to a torch tensor; see ``kvstore.codec.api.decode``."""
    from kvstore.codec.api import decode as _decode

    return _decode(data, **kwargs)


def decode_many(objects: Any, **kwargs: Any) -> Any:
    """Decode several objects (batched on a GPU); see ``kvstore.codec.api.decode_many``."""
    from kvstore.codec.api import decode_many as _decode_many

    return _decode_many(objects, **kwargs)


def decode_layer(data: bytes | memoryview, layer: int, **kwargs: Any) -> Any:
    """Decode one layer of an object; see ``kvstore.codec.api.decode_layer``."""
    from kvstore.codec.api import decode_layer as _decode_layer

    return _decode_layer(data, layer, **kwargs)


__all__ = [
    "DEFAULT_LEVEL",
    "HEADER_BYTES",
    "LEVELS",
    "CodecId",
    "Level",
    "ObjectHeader",
    "decode",
    "decode_layer",
    "decode_many",
    "decode_raw",
    "encode",
    "encode_raw",
    "parse_object",
    "read_header",
    "verify_object",
]
