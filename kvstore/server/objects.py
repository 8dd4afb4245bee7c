"""Stored objects as the daemon serves and accepts them.

``stored_to_raw`` is the ONE place a stored object becomes a raw (uncompressed)
KVC1 object; every read path goes through it, so a compressing codec plugs in
here and nowhere else. A stored kvq object is decoded here (numba, on the CPU: every
caller runs on the I/O pool, never on the event loop) and re-packed as raw.
"""

from __future__ import annotations

from kvstore.codec.format import (
    FLAG_POSITION_FREE,
    HEADER_BYTES,
    CodecId,
    ObjectHeader,
    verify_object,
)
from kvstore.codec.raw import encode_raw, raw_layer_bytes, raw_payload
from kvstore.errors import Corrupt, InvalidArgument
from kvstore.keys import Namespace
from kvstore.layout import KVLayout

ACCEPTED_CODECS = (CodecId.RAW, CodecId.KVQ)  # codec ids a Put may carry


def stored_to_raw(obj: bytes) -> bytes:
    """The raw KVC1 object for a stored object, verified end to end.

    Raises:
        Corrupt: the object fails its checksum or structure, or its codec has no
            decoder in this daemon. Callers treat it as a miss.
    """
    header = verify_object(obj)
    if header.codec_id == CodecId.KVQ:
        return _kvq_to_raw(obj, header)
    if header.codec_id != CodecId.RAW:
        raise Corrupt(f"stored object has codec id {header.codec_id}; this daemon decodes "
                      f"raw ({int(CodecId.RAW)}) and kvq ({int(CodecId.KVQ)})")
    raw_payload(obj, verify=False)  # checks the raw section table against the header
    return obj


def _kvq_to_raw(obj: bytes, header: ObjectHeader) -> bytes:
    """Decode a verified kvq object and re-pack it raw, flags kept.

    ``kvq.decode_kvq`` is the CPU decoder ``kvstore.codec.decode`` runs, minus the
    torch wrapper: it returns the storage array (bfloat16 as its uint16 bits) that
    ``encode_raw`` packs, so the daemon never imports torch.
    """
    from kvstore.codec import kvq  # numba; loaded with the first kvq object

    try:
        _, arr = kvq.decode_kvq(obj, verify=False)  # verified above
        layout = KVLayout(num_layers=header.num_layers, num_kv_heads=header.num_kv_heads,
                          head_dim=header.head_dim, dtype=header.dtype,
                          chunk_tokens=header.num_tokens)
    except InvalidArgument as exc:  # a header no encoder writes: forged bytes
        raise Corrupt(f"kvq object does not decode: {exc}") from exc
    return encode_raw(arr, layout, flags=header.flags)


def verify_stored(obj: bytes) -> ObjectHeader:
    """Check a stored object before returning it as encoded; raises Corrupt."""
    return verify_object(obj)


def layer_bytes(raw_obj: bytes, layer: int) -> memoryview:
    """K and V of one layer of a raw object, ``[2, heads, tokens, dim]``."""
    return raw_layer_bytes(raw_obj, layer)


def max_object_bytes(namespace: Namespace, num_tokens: int) -> int:
    """Upper bound on an acceptable object for a chunk: the raw object's exact size.

    A kvq object larger than that (tiny chunks: its per-section side information
    outweighs the data) is refused; clients send those chunks raw.
    """
    layout = namespace.layout
    elements = layout.num_layers * 2 * layout.num_kv_heads * num_tokens * layout.head_dim
    return HEADER_BYTES + 4 * 2 * layout.num_layers + elements * layout.itemsize


def check_put_object(obj: bytes, namespace: Namespace, num_tokens: int, *,
                     position_free: bool, chunk_index: int) -> ObjectHeader:
    """Verify an object a client sent for one chunk against the request's namespace.

    A bad checksum here is the client's fault (it sent bad bytes), so every
    failure is InvalidArgument naming the chunk and what was expected.
    """
    where = f"chunk {chunk_index}"
    try:
        header = verify_object(obj)
        if header.codec_id == CodecId.RAW:
            raw_payload(obj, verify=False)
        elif header.codec_id == CodecId.KVQ:
            _check_kvq_structure(obj)
    except (Corrupt, InvalidArgument) as exc:
        raise InvalidArgument(f"{where}: object failed verification: {exc}") from exc
    if header.codec_id not in ACCEPTED_CODECS:
        raise InvalidArgument(f"{where}: codec id {header.codec_id} is not accepted by this "
                              f"daemon, expected raw ({int(CodecId.RAW)}) or kvq "
                              f"({int(CodecId.KVQ)})")
    layout = namespace.layout
    expected = (layout.dtype, layout.num_layers, layout.num_kv_heads, layout.head_dim, num_tokens)
    seen = (header.dtype, header.num_layers, header.num_kv_heads, header.head_dim,
            header.num_tokens)
    if seen != expected:
        names = ("dtype", "layers", "heads", "head_dim", "tokens")
        raise InvalidArgument(
            f"{where}: object has {_fields(names, seen)}, namespace {namespace.name!r} wants "
            f"{_fields(names, expected)}"
        )
    want_flags = FLAG_POSITION_FREE if position_free else 0
    if header.flags != want_flags:
        kind = "position-free" if position_free else "prefix"
        raise InvalidArgument(f"{where}: object flags are {header.flags:#x}, expected "
                              f"{want_flags:#x} for a {kind} chunk")
    return header


def _check_kvq_structure(obj: bytes) -> None:
    """Level, section count, meta and size bounds of a kvq object (not a full decode:
    sections that fail to decode later make a Corrupt miss on Get)."""
    from kvstore.codec import kvq

    kvq.parse_kvq(obj, verify=False)


def _fields(names: tuple[str, ...], values: tuple[object, ...]) -> str:
    return " ".join(f"{n}={v}" for n, v in zip(names, values, strict=True))
