"""Per-tenant byte quotas: refuse or evict the tenant's own objects, never another's."""

from __future__ import annotations

import numpy as np
import pytest

from kvstore.client import Client
from kvstore.codec.raw import encode_raw
from kvstore.config import TenantsConfig
from kvstore.errors import CapacityExhausted
from kvstore.keys import ChunkKey
from kvstore.quotas import TenantQuotas
from kvstore.server.app import ServerThread
from tests.conftest import make_config, make_kv, make_tokens

TOKENS = {"tok-a": "alice", "tok-b": "bob"}


def _chunk_bytes(layout) -> int:
    return len(encode_raw(make_kv(layout, layout.chunk_tokens), layout))


def _config(tmp_path, layout, policy: str, alice_chunks: int):
    return make_config(tmp_path / "d", **{
        "server.tokens": TOKENS,
        "tenants.quota_bytes": {"alice": alice_chunks * _chunk_bytes(layout)},
        "tenants.over_quota": policy})


def test_put_over_quota_is_resource_exhausted_and_stores_nothing_more(tmp_path, layout):
    with ServerThread(_config(tmp_path, layout, "refuse", 3)) as srv, \
            Client(srv.address, "m", layout, token="tok-a") as alice, \
            Client(srv.address, "m", layout, token="tok-b") as bob:
        first, kv = make_tokens(48, seed=1), make_kv(layout, 48, seed=1)
        assert alice.put(first, kv) == 48  # 3 chunks: exactly the quota
        more = make_tokens(32, seed=2)
        with pytest.raises(CapacityExhausted, match="alice.*quota"):
            alice.put(more, make_kv(layout, 32, seed=2))
        assert alice.lookup(more) == 0
        assert np.array_equal(alice.get(first, as_numpy=True), kv)
        # bob has no quota and is not limited by alice's
        assert bob.put(make_tokens(160, seed=3), make_kv(layout, 160, seed=3)) == 160
        # deleting frees quota
        assert alice.delete(first) == 3
        assert alice.put(more, make_kv(layout, 32, seed=2)) == 32
        usage = srv.engine.tenant_usage()
        assert usage["alice"].num_refused == 1 and usage["alice"].used_bytes == 2 * _chunk_bytes(
            layout)


def test_over_quota_evicts_only_the_tenants_own_oldest_chunks(tmp_path, layout):
    with ServerThread(_config(tmp_path, layout, "evict", 2)) as srv, \
            Client(srv.address, "m", layout, token="tok-a") as alice, \
            Client(srv.address, "m", layout, token="tok-b") as bob:
        bob_tokens, bob_kv = make_tokens(64, seed=5), make_kv(layout, 64, seed=5)
        assert bob.put(bob_tokens, bob_kv) == 64
        seqs = [(make_tokens(16, seed=10 + i), make_kv(layout, 16, seed=10 + i))
                for i in range(4)]
        for tokens, kv in seqs:
            assert alice.put(tokens, kv) == 16
        # alice keeps her 2 newest chunks; the 2 oldest made room
        assert [alice.lookup(t) for t, _ in seqs] == [0, 0, 16, 16]
        assert np.array_equal(alice.get(seqs[3][0], as_numpy=True), seqs[3][1])
        # bob's chunks were never touched, in any tier
        assert bob.lookup(bob_tokens) == 64
        assert np.array_equal(bob.get(bob_tokens, as_numpy=True), bob_kv)
        assert srv.engine.tenant_usage()["alice"].num_evicted == 2


def test_object_larger_than_the_whole_quota_is_refused_even_under_evict():
    quotas = TenantQuotas(TenantsConfig(quota_bytes={"t": 100}, over_quota="evict"))
    deleted: list[bytes] = []
    quotas.admit("t", ChunkKey(b"a" * 32), 60, stored=lambda ks: [True] * len(ks),
                 delete=deleted.append)
    with pytest.raises(CapacityExhausted, match="'t'"):
        quotas.admit("t", ChunkKey(b"b" * 32), 101, stored=lambda ks: [True] * len(ks),
                     delete=deleted.append)
    assert deleted == [] and quotas.usage()["t"].used_bytes == 60


def test_quota_prunes_objects_the_tiers_dropped_on_their_own(tmp_path, layout):
    """Objects LRU dropped from every tier stop counting when the tenant next hits its quota."""
    chunk = _chunk_bytes(layout)
    config = make_config(tmp_path / "d", **{
        "server.tokens": TOKENS, "tenants.quota_bytes": {"alice": 3 * chunk},
        "tiers.disk.enabled": False, "tiers.cpu.capacity_bytes": 2 * chunk + 64})
    with ServerThread(config) as srv, Client(srv.address, "m", layout, token="tok-a") as alice:
        for i in range(6):  # DRAM holds 2: the rest are evicted with no disk below
            assert alice.put(make_tokens(16, seed=30 + i), make_kv(layout, 16, seed=30 + i)) == 16
        assert srv.engine.tenant_usage()["alice"].used_bytes <= 3 * chunk
        assert srv.engine.tenant_usage()["alice"].num_refused == 0
