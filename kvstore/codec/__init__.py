"""Codecs and the KVC1 object format (DESIGN §3).

Importing this package is cheap: compressing codecs load on first use.
"""

from kvstore.codec.format import (
    HEADER_BYTES,
    CodecId,
    ObjectHeader,
    parse_object,
    read_header,
    verify_object,
)
from kvstore.codec.raw import decode_raw, encode_raw

__all__ = [
    "HEADER_BYTES",
    "CodecId",
    "ObjectHeader",
    "decode_raw",
    "encode_raw",
    "parse_object",
    "read_header",
    "verify_object",
]
