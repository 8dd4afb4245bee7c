"""Namespace ids and the prefix hash chain: stable, chained, namespace-scoped."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from kvstore.errors import InvalidArgument
from kvstore.keys import Namespace, position_free_key, prefix_keys, tokens_to_array
from kvstore.layout import KVLayout

LAYOUT = KVLayout(num_layers=30, num_kv_heads=3, head_dim=64, chunk_tokens=4)

_SCRIPT = """
import json
from kvstore.keys import Namespace, prefix_keys, position_free_key
from kvstore.layout import KVLayout
ns = Namespace("smollm2-135m", KVLayout(30, 3, 64, chunk_tokens=4), tenant="t1")
print(json.dumps([k.hex() for k in prefix_keys(ns, list(range(10)))]
                 + [position_free_key(ns, [5, 6, 7]).hex()]))
"""


def test_keys_identical_across_fresh_interpreters() -> None:
    runs = [
        json.loads(subprocess.run([sys.executable, "-c", _SCRIPT], check=True,
                                  capture_output=True, text=True,
                                  env={"PYTHONHASHSEED": seed, "PATH": ""}).stdout)
        for seed in ("1", "2")
    ]
    assert runs[0] == runs[1]
    # Pinned digest: a change to the derivation must be deliberate (bump KEY_SCHEME_VERSION).
    ns = Namespace("smollm2-135m", LAYOUT, tenant="t1")
    assert runs[0][0] == prefix_keys(ns, list(range(10)))[0].hex()


def test_prefix_keys_skip_partial_last_chunk() -> None:
    ns = Namespace("m", LAYOUT)
    assert len(prefix_keys(ns, list(range(11)))) == 2
    assert prefix_keys(ns, [1, 2, 3]) == []


def test_prefix_keys_chain_depends_on_every_earlier_token() -> None:
    ns = Namespace("m", LAYOUT)
    a = prefix_keys(ns, [1, 2, 3, 4, 5, 6, 7, 8])
    b = prefix_keys(ns, [9, 2, 3, 4, 5, 6, 7, 8])
    assert a[0] != b[0] and a[1] != b[1]
    # A shared prefix gives shared leading keys.
    c = prefix_keys(ns, [1, 2, 3, 4, 0, 0, 0, 0])
    assert a[0] == c[0] and a[1] != c[1]


@pytest.mark.parametrize(
    "other",
    [
        Namespace("other", LAYOUT),
        Namespace("m", LAYOUT, tenant="t"),
        Namespace("m", LAYOUT, tp_rank=1),
        Namespace("m", KVLayout(30, 3, 64, dtype="bfloat16", chunk_tokens=4)),
        Namespace("m", KVLayout(29, 3, 64, chunk_tokens=4)),
    ],
)
def test_keys_never_collide_across_namespaces(other: Namespace) -> None:
    ns = Namespace("m", LAYOUT)
    tokens = list(range(8))
    assert set(prefix_keys(ns, tokens)).isdisjoint(prefix_keys(other, tokens))
    assert position_free_key(ns, tokens) != position_free_key(other, tokens)


def test_position_free_key_independent_of_position_but_not_of_length() -> None:
    ns = Namespace("m", LAYOUT)
    assert position_free_key(ns, [1, 2, 3]) == position_free_key(ns, np.array([1, 2, 3]))
    assert position_free_key(ns, [1, 2, 3]) != position_free_key(ns, [1, 2, 3, 0])
    assert position_free_key(ns, [1, 2, 3, 4]) != prefix_keys(ns, [1, 2, 3, 4])[0]


@pytest.mark.parametrize("bad", [[[1, 2]], [1.5, 2.0], [2**31], ["a"]])
def test_tokens_rejected_when_not_1d_int32(bad: object) -> None:
    with pytest.raises(InvalidArgument):
        tokens_to_array(bad)  # type: ignore[arg-type]


def test_namespace_rejects_empty_name_and_negative_rank() -> None:
    with pytest.raises(InvalidArgument, match="non-empty"):
        Namespace("", LAYOUT)
    with pytest.raises(InvalidArgument, match="tp_rank"):
        Namespace("m", LAYOUT, tp_rank=-1)
