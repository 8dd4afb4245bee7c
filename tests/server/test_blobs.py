"""PutBlob/GetBlob and the pre-RoPE namespace flag through a real daemon on port 0."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from kvstore.client import Client
from kvstore.errors import CapacityExhausted, InvalidArgument, PermissionDenied
from kvstore.server.app import ServerThread
from tests.conftest import make_config, make_kv, make_tokens

KIND = "sparse-shadow-v1:test"


def test_blob_round_trips_and_is_exact_to_tokens_and_kind(client):
    c = client()
    tokens = make_tokens(37)
    assert c.get_blob(tokens, KIND) is None
    assert not c.put_blob(tokens, KIND, b"old bytes")
    assert c.put_blob(tokens, KIND, b"bundle bytes")  # the last put wins
    assert c.get_blob(tokens, KIND) == b"bundle bytes"
    assert c.get_blob(tokens[:-1], KIND) is None  # a prefix is another sequence
    assert c.get_blob(tokens, KIND + "x") is None
    assert client("other@rev").get_blob(tokens, KIND) is None


def test_blob_survives_restart_through_the_disk_tier(tmp_path: Path, layout):
    config = make_config(tmp_path / "d", **{"engine.write_policy": "write-through"})
    tokens, data = make_tokens(20), bytes(range(256)) * 100
    with ServerThread(config) as srv, Client(srv.address, "m", layout) as c:
        assert not c.put_blob(tokens, KIND, data)
    with ServerThread(config) as srv, Client(srv.address, "m", layout) as c:
        assert c.get_blob(tokens, KIND) == data


def test_corrupt_blob_on_disk_is_a_miss_and_counted(tmp_path: Path, layout):
    config = make_config(tmp_path / "d", **{"engine.write_policy": "write-through"})
    tokens = make_tokens(20)
    with ServerThread(config) as srv, Client(srv.address, "m", layout) as c:
        c.put_blob(tokens, KIND, b"x" * 5000)
    files = [p for p in (tmp_path / "d").rglob("*.kvc")]
    assert len(files) == 1
    raw = bytearray(files[0].read_bytes())
    raw[-10] ^= 0xFF
    files[0].write_bytes(bytes(raw))
    with ServerThread(config) as srv, Client(srv.address, "m", layout) as c:
        assert c.get_blob(tokens, KIND) is None
        assert sum(t["corrupt"] for t in c.stats()["tiers"]) == 1
        assert not c.put_blob(tokens, KIND, b"y" * 10)  # the corrupt one was dropped
        assert c.get_blob(tokens, KIND) == b"y" * 10


def test_blob_bad_requests_are_invalid_argument(client):
    c = client()
    with pytest.raises(InvalidArgument, match="at least one token"):
        c.put_blob([], KIND, b"x")
    with pytest.raises(InvalidArgument, match="kind"):
        c.get_blob(make_tokens(4), "k" * 129)
    with pytest.raises(InvalidArgument, match="at least 1 byte"):
        c.put_blob(make_tokens(4), KIND, b"")


def test_blob_over_the_message_limit_is_resource_exhausted(tmp_path: Path, layout):
    config = make_config(tmp_path / "d", **{"server.max_message_bytes": 1 << 20})
    with ServerThread(config) as srv, Client(srv.address, "m", layout) as c:
        with pytest.raises(CapacityExhausted, match="message limit"):
            c.put_blob(make_tokens(4), KIND, b"z" * ((1 << 20) - 100))


def test_blobs_are_per_tenant(tmp_path: Path, layout):
    config = make_config(tmp_path / "d", **{"server.tokens": {"tok-a": "alice",
                                                              "tok-b": "bob"}})
    tokens = make_tokens(9)
    with ServerThread(config) as srv:
        with Client(srv.address, "m", layout, token="tok-a") as alice:
            alice.put_blob(tokens, KIND, b"alice's")
            assert alice.get_blob(tokens, KIND) == b"alice's"
        with Client(srv.address, "m", layout, token="tok-b") as bob:
            assert bob.get_blob(tokens, KIND) is None
        with Client(srv.address, "m", layout, token="nope") as anon:
            with pytest.raises(PermissionDenied):
                anon.get_blob(tokens, KIND)


def test_async_blob_round_trip(server, layout):
    from kvstore.client import AsyncClient

    tokens = make_tokens(12)

    async def run() -> tuple[bool, bytes | None]:
        async with AsyncClient(server.address, "model@rev", layout, timeout_s=20.0) as ac:
            return await ac.put_blob(tokens, KIND, b"abc"), await ac.get_blob(tokens, KIND)

    assert asyncio.run(run()) == (False, b"abc")


# ------------------------------------------------------------ pre-RoPE namespaces


@pytest.mark.parametrize("first_pre_rope", [True, False])
def test_namespace_refuses_client_expecting_other_key_positions(client, layout,
                                                                first_pre_rope: bool):
    first = client("m", replace(layout, keys_pre_rope=first_pre_rope))
    tokens, kv = make_tokens(32), make_kv(layout, 32)
    assert first.put(tokens, kv) == 32
    other = client("m", replace(layout, keys_pre_rope=not first_pre_rope))
    want = "pre-RoPE" if first_pre_rope else "post-RoPE"
    for call in (lambda: other.lookup(tokens), lambda: other.get(tokens),
                 lambda: other.put(tokens, kv), lambda: other.get_blob(tokens, KIND),
                 lambda: other.fetch_blocks(tokens, 0, 0, [0], [0])):
        with pytest.raises(InvalidArgument, match=f"holds {want} keys"):
            call()
    assert np.array_equal(first.get(tokens, as_numpy=True), kv)


def test_key_positions_survive_restart_and_default_is_post_rope(tmp_path: Path, layout):
    config = make_config(tmp_path / "d")
    pre = replace(layout, keys_pre_rope=True)
    with ServerThread(config) as srv, Client(srv.address, "sparse", pre) as c:
        c.put_blob(make_tokens(5), KIND, b"b")  # a blob registers the namespace too
    with ServerThread(config) as srv, Client(srv.address, "sparse", layout) as c:
        assert not layout.keys_pre_rope
        with pytest.raises(InvalidArgument, match="holds pre-RoPE keys, the request expects "
                                                  "post-RoPE"):
            c.put(make_tokens(16), make_kv(layout, 16))


def test_pre_rope_namespace_keys_never_meet_post_rope_ones(layout):
    from kvstore.keys import Namespace, prefix_keys

    tokens = make_tokens(32)
    pre = Namespace("m", replace(layout, keys_pre_rope=True))
    post = Namespace("m", layout)
    # even a daemon that lost its registry (memory only) cannot mix the two kinds
    assert not set(prefix_keys(pre, tokens)) & set(prefix_keys(post, tokens))
