"""Shadow bundles persisted in a real daemon: reloaded instead of recomputed, bad ones ignored."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvstore.client import Client
from kvstore.client._blobs import PartManifest, part_kind
from kvstore.errors import InvalidArgument
from kvstore.keys import Namespace
from kvstore.server.app import ServerThread
from kvstore.server.blobs import blob_key
from kvstore.sparse import DaemonSequenceStore, SparseConfig, generate, sequence_kind
from kvstore.sparse.shadow import ShadowBundle
from tests.conftest import SMOLLM2_LAYOUT, make_config
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
    from kvstore.models.arch import fingerprint_of

    return fingerprint_of(model), SparseConfig(budget_tokens=OPTIONS["budget_tokens"])


def _flip_byte(data: bytes) -> bytes:
    flipped = bytearray(data)
    flipped[len(flipped) // 2] ^= 0x40
    return bytes(flipped)


def _drop_blob(server: Any, namespace: str, layout: Any, tokens: list[int], kind: str) -> None:
    """Remove one blob from every tier, as an eviction would."""
    key = blob_key(Namespace(namespace, layout), np.asarray(tokens, dtype="<i4"), kind.encode())
    assert server.engine.delete(key)


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
    fields = {"tokens_le_i32": np.asarray(ids[:-1], "<i4").tobytes()}
    manifest = PartManifest.from_bytes(c._run(c._get_one_blob(fields, kind)))  # as stored
    assert manifest.num_parts == 3 and manifest.total_bytes > 2 * PARTED_LIMIT_BYTES
    assert c.get_blob(ids[:-1], kind)[:4] == b"KVSB"  # get_blob joins the parts
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
