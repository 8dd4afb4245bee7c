"""Hypothesis strategies that build any protobuf message from its descriptor.

Fields get values across their whole wire range (enums include values the schema
does not name, bytes include lengths that are not multiples of 4), and a field named
``namespace`` is half the time a valid one, so requests also reach past validation.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from hypothesis import strategies as st

from kvstore._proto import kvstore_pb2 as pb
from tests.conftest import SMALL_LAYOUT

_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def _int(lo: int, hi: int) -> st.SearchStrategy[int]:
    """Small values (where the interesting checks are) and the extremes of the type."""
    edges = [v for v in (lo, hi, 0, 1, -1, 2**31 - 1, 2**32 - 1) if lo <= v <= hi]
    return st.one_of(st.integers(max(lo, -4), min(hi, 300)), st.sampled_from(edges),
                     st.integers(lo, hi))


def valid_namespace() -> pb.Namespace:
    lay = SMALL_LAYOUT
    return pb.Namespace(name="fuzz", layout=pb.Layout(
        num_layers=lay.num_layers, num_kv_heads=lay.num_kv_heads, head_dim=lay.head_dim,
        dtype=pb.DTYPE_FLOAT16, chunk_tokens=lay.chunk_tokens))


def _tokens() -> st.SearchStrategy[bytes]:
    """Little-endian int32 token ids: mostly whole chunks of small ids, sometimes ragged."""
    whole = st.lists(st.integers(0, 50_000), max_size=80).map(
        lambda ids: b"".join(i.to_bytes(4, "little") for i in ids))
    return st.one_of(whole, st.binary(max_size=70))


def _scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    if field.type in _INT_RANGES:
        return _int(*_INT_RANGES[field.type])
    if field.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if field.type == FieldDescriptor.TYPE_ENUM:
        return _int(-(2**31), 2**31 - 1)  # proto3 enums are open: unnamed values arrive too
    if field.type in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return st.floats(allow_nan=True, allow_infinity=True, width=32)
    if field.type == FieldDescriptor.TYPE_STRING:
        return st.text(max_size=40)
    if field.name.startswith("tokens"):
        return _tokens()
    return st.binary(max_size=2048)


def _field(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        if field.message_type.GetOptions().map_entry:
            return st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3)
        inner = message(field.message_type, depth + 1)
        if field.message_type.full_name == pb.Namespace.DESCRIPTOR.full_name:
            inner = st.one_of(st.just(valid_namespace()), inner)
    else:
        inner = _scalar(field)
    if field.is_repeated:
        return st.lists(inner, max_size=6)
    return inner


def message(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[Any]:
    """Messages of ``descriptor``'s type with any subset of fields set."""
    cls = getattr(pb, descriptor.name)
    if depth > 3:
        return st.just(cls())
    fields = {f.name: _field(f, depth) for f in descriptor.fields}
    return st.fixed_dictionaries({}, optional=fields).map(lambda kw: _build(cls, kw))


def _build(cls: Any, values: dict[str, Any]) -> Any:
    msg = cls()
    for name, value in values.items():
        field = cls.DESCRIPTOR.fields_by_name[name]
        target = getattr(msg, name) if field.type == FieldDescriptor.TYPE_MESSAGE else None
        if field.is_repeated:
            if isinstance(value, dict):
                target.update(value)
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                target.extend(value)
            else:
                getattr(msg, name).extend(value)
        elif target is not None:
            target.CopyFrom(value)
        else:
            setattr(msg, name, value)
    return msg
