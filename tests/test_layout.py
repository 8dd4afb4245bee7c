"""KVLayout validation and derived sizes."""

from __future__ import annotations

import pytest

from kvstore.errors import InvalidArgument
from kvstore.layout import KVLayout


def test_layout_sizes_match_smollm2_chunk() -> None:
    layout = KVLayout(num_layers=30, num_kv_heads=3, head_dim=64)
    assert layout.chunk_shape == (30, 2, 3, 256, 64)
    assert layout.chunk_bytes == 30 * 2 * 3 * 256 * 64 * 2
    assert layout.section_bytes == 3 * 256 * 64 * 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_layers": 0}, "num_layers"),
        ({"head_dim": -1}, "head_dim"),
        ({"dtype": "int8"}, "dtype"),
        ({"chunk_tokens": 1.5}, "chunk_tokens"),
        ({"num_kv_heads": True}, "num_kv_heads"),
    ],
)
def test_layout_rejects_bad_fields(kwargs: dict, match: str) -> None:
    base = {"num_layers": 2, "num_kv_heads": 1, "head_dim": 8}
    with pytest.raises(InvalidArgument, match=match):
        KVLayout(**{**base, **kwargs})
