"""The client's use of compressing codecs: encode before Put, decode encoded Gets.

Everything heavy is imported on first use: ``kvstore.codec.encode``/``decode``
load torch and numba, ``kvstore.codec.kvq`` loads numba. A client that stores and
reads raw objects never loads them (``import kvstore.client`` stays light).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvstore.codec.format import HEADER_BYTES, CodecId, ObjectHeader, read_header
from kvstore.codec.levels import LEVELS
from kvstore.codec.raw import encode_raw
from kvstore.errors import Corrupt, InvalidArgument
from kvstore.layout import KVLayout

DECODE_SITES = ("server", "client")  # who decodes a compressed object on get


def check_codec(codec: str) -> str:
    if codec not in LEVELS:
        raise InvalidArgument(f"codec must be one of {list(LEVELS)}, got {codec!r}")
    return codec


def check_decode(decode: str) -> str:
    if decode not in DECODE_SITES:
        raise InvalidArgument(f"decode must be one of {DECODE_SITES}, got {decode!r}")
    return decode


def encode_chunk(piece: np.ndarray, layout: KVLayout, codec: str, flags: int,
                 model: str) -> bytes:
    """The KVC1 object of one chunk (storage array) at ``codec``.

    kvq levels use the calibration table ``kvstore.codec.autocal`` picks for the
    namespace's model (``model``: the namespace name): the user's own, a shipped one
    for a known model, or one built from the namespace's first chunks.

    A kvq object that is not smaller than the raw one (a few tokens: side
    information outweighs the data) is sent raw instead: raw is exact, and the
    daemon refuses objects over the raw size.
    """
    if codec == "raw":
        return encode_raw(piece, layout, flags=flags)
    from kvstore.codec import autocal, encode

    table = autocal.table_for(model, layout, piece)
    obj = encode(piece, layout, codec, table=table, flags=flags)
    raw_bytes = HEADER_BYTES + 4 * 2 * layout.num_layers + piece.nbytes
    return obj if len(obj) < raw_bytes else encode_raw(piece, layout, flags=flags)


def check_object_header(data: bytes | memoryview, index: int, layout: KVLayout,
                        num_tokens: int) -> ObjectHeader:
    """The header of a received object; Corrupt unless it matches the request."""
    header = read_header(data)
    seen = (header.dtype, header.num_layers, header.num_kv_heads, header.head_dim,
            header.num_tokens)
    want = (layout.dtype, layout.num_layers, layout.num_kv_heads, layout.head_dim, num_tokens)
    if seen != want:
        raise Corrupt(f"chunk {index}: object has (dtype, layers, heads, head_dim, tokens) "
                      f"{seen}, expected {want}")
    if header.codec_id not in (CodecId.RAW, CodecId.KVQ):
        raise Corrupt(f"chunk {index}: unknown codec id {header.codec_id}")
    return header


def decode_kvq_into(data: bytes, index: int, layout: KVLayout, num_tokens: int,
                    positions: dict[int, int], dst: np.ndarray) -> None:
    """Verify and decode a kvq object (on the CPU) into ``dst`` ([len(layers), 2, heads,
    T, dim], storage dtype); the same-host path uses it for chunks stored compressed."""
    from kvstore.codec import kvq

    check_object_header(data, index, layout, num_tokens)
    _, arr = kvq.decode_kvq(data, verify=True)  # raises Corrupt
    for layer, position in positions.items():
        dst[position] = arr[layer]


def decode_objects(objects: Sequence[bytes], layout: KVLayout, num_tokens: int,
                   layers: list[int] | None, device: Any) -> Any:
    """Decode a Get's encoded objects (chunk order) into one torch tensor.

    ``[len(layers), 2, heads, n * T, dim]`` on ``device`` (None: the CPU);
    ``device="cuda"`` decodes the kvq objects in one batch with the codec's Triton
    kernels.
    """
    import torch

    from kvstore.codec import decode_many

    for index, data in enumerate(objects):
        check_object_header(data, index, layout, num_tokens)
    parts = decode_many(objects, device=device)  # verifies; raises Corrupt
    out = torch.cat(parts, dim=3) if len(parts) > 1 else parts[0]
    return out if layers is None else out[layers].contiguous()


@dataclass(slots=True)
class EncodedObjects:
    """The objects of an encoded Get stream: chunks 0..n-1 in order, all announcing n.

    A stream that ends early leaves the complete leading chunks, as for raw Gets.
    """

    objects: list[bytes | memoryview] = field(default_factory=list)
    num_chunks: int | None = None  # from the first message

    def add(self, msg: Any) -> None:
        if self.num_chunks is None:
            self.num_chunks = msg.num_chunks
        want = len(self.objects)
        if (msg.chunk_index, msg.num_chunks) != (want, self.num_chunks) or not msg.num_chunks \
                or msg.layer is not None:
            raise Corrupt(f"daemon sent chunk {msg.chunk_index} of {msg.num_chunks}, expected "
                          f"the whole object of chunk {want} of {self.num_chunks}")
        self.objects.append(msg.data)
