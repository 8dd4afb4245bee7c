"""Shadow bundles persisted in a real daemon: reloaded instead of recomputed, bad ones ignored."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvstore.client import Client
from kvstore.errors import CapacityExhausted, InvalidArgument
from kvstore.keys import Namespace
from kvstore.server.app import ServerThread
from kvstore.server.blobs import blob_key
from kvstore.sparse import DaemonSequenceStore, SparseConfig, generate, sequence_kind
from kvstore.sparse.shadow import ShadowBundle
from kvstore.sparse.store import MAX_PART_BYTES, PartedBlobs, PartManifest, part_kind
from tests.conftest import SMALL_LAYOUT, SMOLLM2_LAYOUT, make_config
from tests.sparse.conftest import smollm2_with_prompt

PRE_ROPE = replace(SMOLLM2_LAYOUT, keys_pre_rope=True)
OPTIONS = {"budget_tokens": 128, "max_new_tokens": 6}


def test_daemon_store_refuses_a_post_rope_namespace(server) -> None:
    with Client(server.address, "smollm2", SMOLLM2_LAYOUT) as c:
        with pytest.raises(InvalidArgument, match="keys_pre_rope=True"):
            DaemonSequenceStore(c)


@pytest.fixture(scope="module")
def smollm2():
    # 299 prefix tokens: one 256-token chunk, 5 loose blocks, a 3-token tail
    return smollm2_with_prompt(2000)


@pytest.mark.model
@pytest.mark.slow
def test_second_generate_reloads_bundle_and_matches_after_restart(smollm2, tmp_path: Path):
    model, ids = smollm2
    config = make_config(tmp_path / "d", **{"engine.write_policy": "write-through"})
    with ServerThread(config) as srv, Client(srv.address, "smollm2", PRE_ROPE) as c:
        store = DaemonSequenceStore(c)
        first = generate(model, ids, store, **OPTIONS)
        assert (store.num_saved, store.num_loaded) == (1, 0)
        assert c.lookup(ids[:-1]) == 256  # the whole chunk went in as an ordinary chunk
        second = generate(model, ids, store, **OPTIONS)
        assert (store.num_saved, store.num_loaded) == (1, 1)  # no second SVD
    assert second == first
    with ServerThread(config) as srv, Client(srv.address, "smollm2", PRE_ROPE) as c:
        store = DaemonSequenceStore(c)  # another process would start like this
        assert generate(model, ids, store, **OPTIONS) == first
        assert (store.num_saved, store.num_loaded) == (0, 1)


@pytest.mark.model
@pytest.mark.slow
def test_mismatched_or_corrupt_bundle_is_recomputed_never_used(smollm2, client):
    model, ids = smollm2
    c = client("smollm2", PRE_ROPE)
    store = DaemonSequenceStore(c)
    want = generate(model, ids, store, **OPTIONS)
    kind = sequence_kind(*_fingerprint_and_cfg(model))
    good = c.get_blob(ids[:-1], kind)
    bundle = ShadowBundle.from_bytes(good)
    forged = [replace(bundle, fingerprint="0" * 32).to_bytes(),  # another model's shadows
              replace(bundle, num_tokens=bundle.num_tokens - 1).to_bytes(),  # another prefix
              replace(bundle, layers={i: sh for i, sh in bundle.layers.items() if i != 5}
                      ).to_bytes(),  # another layout of dense and sparse layers
              _flip_byte(good)]  # bit rot that kept the daemon's checksum (a client bug)
    for bad in forged:
        c.put_blob(ids[:-1], kind, bad)
        saved = store.num_saved
        assert generate(model, ids, store, **OPTIONS) == want
        assert store.num_saved == saved + 1  # rebuilt, and the good bundle put back
        assert c.get_blob(ids[:-1], kind) == good


def _fingerprint_and_cfg(model) -> tuple[str, SparseConfig]:
    from kvstore.sparse.llama import fingerprint_of

    return fingerprint_of(model), SparseConfig(budget_tokens=OPTIONS["budget_tokens"])


def _flip_byte(data: bytes) -> bytes:
    flipped = bytearray(data)
    flipped[len(flipped) // 2] ^= 0x40
    return bytes(flipped)


# ------------------------------------------------------------ blobs over the message limit

BLOB_TOKENS = list(range(100))
SMALL_LIMIT_BYTES = 256 << 10  # parts of 192 KiB less the tokens


class CountingClient:
    """A real client that counts blob calls and refuses PutBlob after ``num_puts_ok``."""

    def __init__(self, client: Client, num_puts_ok: int = 1 << 30) -> None:
        self.client, self.num_puts_ok = client, num_puts_ok
        self.num_puts = self.num_gets = 0

    def put_blob(self, tokens: Any, kind: str, data: bytes) -> bool:
        if self.num_puts >= self.num_puts_ok:
            raise CapacityExhausted("injected: no tier holds it")
        self.num_puts += 1
        return self.client.put_blob(tokens, kind, data)

    def get_blob(self, tokens: Any, kind: str) -> bytes | None:
        self.num_gets += 1
        return self.client.get_blob(tokens, kind)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)


def _random_bytes(num_bytes: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, num_bytes, dtype=np.uint8).tobytes()


def _drop_blob(server: Any, namespace: str, layout: Any, tokens: list[int], kind: str) -> None:
    """Remove one blob from every tier, as an eviction would."""
    key = blob_key(Namespace(namespace, layout), np.asarray(tokens, dtype="<i4"), kind.encode())
    assert server.engine.delete(key)


def test_blob_that_fits_a_message_is_stored_whole_in_one_round_trip(client) -> None:
    c = CountingClient(client(max_message_bytes=SMALL_LIMIT_BYTES))
    blobs, data = PartedBlobs(c), _random_bytes(1000, seed=0)
    assert blobs.put(BLOB_TOKENS, "k", data) == 1
    assert blobs.get(BLOB_TOKENS, "k") == data
    assert (c.num_puts, c.num_gets) == (1, 1)
    assert c.get_blob(BLOB_TOKENS, "k") == data  # the blob itself, no manifest


def test_blob_over_the_message_limit_round_trips_in_parts(client) -> None:
    c = client(max_message_bytes=SMALL_LIMIT_BYTES)
    blobs, data = PartedBlobs(c), _random_bytes(500_000, seed=1)
    part_bytes = blobs.part_bytes(BLOB_TOKENS)
    assert part_bytes == SMALL_LIMIT_BYTES - (64 << 10) - 4 * len(BLOB_TOKENS)
    assert blobs.put(BLOB_TOKENS, "k", data) == 3 + 1  # three parts and the manifest
    manifest = PartManifest.from_bytes(c.get_blob(BLOB_TOKENS, "k"))
    assert (manifest.total_bytes, manifest.part_bytes, manifest.num_parts) == (
        len(data), part_bytes, 3)
    assert [c.get_blob(BLOB_TOKENS, part_kind("k", i, 3)) for i in range(3)] == [
        data[:part_bytes], data[part_bytes : 2 * part_bytes], data[2 * part_bytes :]]
    assert blobs.get(BLOB_TOKENS, "k") == data
    assert blobs.num_broken == 0


def test_part_size_is_capped_and_refused_when_tokens_fill_the_message(client) -> None:
    assert PartedBlobs(client()).part_bytes(BLOB_TOKENS) == MAX_PART_BYTES  # 64 MiB limit
    blobs = PartedBlobs(client(max_message_bytes=SMALL_LIMIT_BYTES))
    with pytest.raises(CapacityExhausted, match="40000 tokens leave"):
        blobs.put(list(range(40_000)), "k", b"x")  # 160 KB of tokens in a 256 KiB message


def test_blob_with_a_missing_or_damaged_part_reads_as_a_miss(server, client) -> None:
    c = client(max_message_bytes=SMALL_LIMIT_BYTES)
    blobs, data = PartedBlobs(c), _random_bytes(500_000, seed=2)
    blobs.put(BLOB_TOKENS, "k", data)
    good_part = c.get_blob(BLOB_TOKENS, part_kind("k", 1, 3))
    good_manifest = c.get_blob(BLOB_TOKENS, "k")
    damages = [(part_kind("k", 1, 3), _flip_byte(good_part)),  # same length, other bytes
               (part_kind("k", 1, 3), good_part[:-1]),  # wrong size
               ("k", _flip_byte(good_manifest)),  # manifest fails its checksum
               ("k", PartManifest(len(data), blobs.part_bytes(BLOB_TOKENS) // 2, 6,
                                  PartManifest.from_bytes(good_manifest).blob_xxh3
                                  ).to_bytes())]  # a count of parts never written
    for num_broken, (kind, bad) in enumerate(damages, start=1):
        c.put_blob(BLOB_TOKENS, kind, bad)
        assert blobs.get(BLOB_TOKENS, "k") is None
        assert blobs.num_broken == num_broken
        blobs.put(BLOB_TOKENS, "k", data)
        assert blobs.get(BLOB_TOKENS, "k") == data
    _drop_blob(server, "model@rev", SMALL_LAYOUT, BLOB_TOKENS, part_kind("k", 2, 3))
    assert blobs.get(BLOB_TOKENS, "k") is None
    assert blobs.num_broken == len(damages) + 1


def test_put_that_fails_part_way_never_reads_as_a_mix_of_two_blobs(client) -> None:
    c = client(max_message_bytes=SMALL_LIMIT_BYTES)
    first, second = _random_bytes(500_000, seed=3), _random_bytes(500_000, seed=4)
    blobs = PartedBlobs(c)
    blobs.put(BLOB_TOKENS, "k", first)
    with pytest.raises(CapacityExhausted, match="injected"):
        PartedBlobs(CountingClient(c, num_puts_ok=2)).put(BLOB_TOKENS, "k", second)
    size = blobs.part_bytes(BLOB_TOKENS)
    stored = [c.get_blob(BLOB_TOKENS, part_kind("k", i, 3)) for i in range(3)]
    assert stored == [second[:size], second[size : 2 * size], first[2 * size :]]
    assert blobs.get(BLOB_TOKENS, "k") is None  # the manifest of `first` rejects the mix
    assert blobs.num_broken == 1
    blobs.put(BLOB_TOKENS, "k", second)  # the re-put replaces every part and the manifest
    assert blobs.get(BLOB_TOKENS, "k") == second


# the 299-token bundle (~2.6 MB) is over a 1 MiB limit, its 40 loose tokens (0.9 MB) are not
PARTED_LIMIT_BYTES = 1 << 20


@pytest.fixture(scope="module")
def parted(smollm2, tmp_path_factory):
    """(daemon, client, store, tokens) with a 1 MiB message limit, the bundle saved."""
    model, ids = smollm2
    config = make_config(tmp_path_factory.mktemp("parted"),
                         **{"server.max_message_bytes": PARTED_LIMIT_BYTES})
    with ServerThread(config) as srv, Client(srv.address, "smollm2", PRE_ROPE,
                                             max_message_bytes=PARTED_LIMIT_BYTES) as c:
        store = DaemonSequenceStore(c)
        want = generate(model, ids, store, **OPTIONS)
        assert (store.num_saved, store.num_loaded) == (1, 0)
        yield srv, c, store, want


@pytest.mark.model
@pytest.mark.slow
def test_bundle_over_the_message_limit_is_saved_in_parts_and_reloaded(smollm2, parted):
    model, ids = smollm2
    _, c, store, want = parted
    kind = sequence_kind(*_fingerprint_and_cfg(model))
    manifest = PartManifest.from_bytes(c.get_blob(ids[:-1], kind))
    assert manifest.num_parts == 3 and manifest.total_bytes > 2 * PARTED_LIMIT_BYTES
    assert c.get_blob(ids[:-1], kind + "+blocks")[:4] == b"KVC1"  # 0.9 MB: stored whole
    saved, loaded = store.num_saved, store.num_loaded
    assert generate(model, ids, store, **OPTIONS) == want
    assert (store.num_saved, store.num_loaded) == (saved, loaded + 1)  # no prefill, no SVD


@pytest.mark.model
@pytest.mark.slow
def test_bundle_with_a_missing_or_corrupt_part_is_recomputed(smollm2, parted):
    model, ids = smollm2
    srv, c, store, want = parted
    prefix, kind = ids[:-1], sequence_kind(*_fingerprint_and_cfg(model))
    part = part_kind(kind, 1, 3)
    good = c.get_blob(prefix, part)
    damages = [lambda: _drop_blob(srv, "smollm2", PRE_ROPE, prefix, part),  # evicted
               lambda: c.put_blob(prefix, part, _flip_byte(good))]  # another bundle's bytes
    for damage in damages:
        damage()
        saved, loaded = store.num_saved, store.num_loaded
        assert generate(model, ids, store, **OPTIONS) == want
        assert (store.num_saved, store.num_loaded) == (saved + 1, loaded)  # rebuilt, put back
        assert c.get_blob(prefix, part) == good
