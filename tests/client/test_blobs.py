"""Blobs over one message: put_blob stores parts and a manifest, get_blob joins and verifies."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from kvstore.client import Client
from kvstore.client._blobs import MAX_PART_BYTES, PARTS_MAGIC, PartManifest, part_kind, part_size
from kvstore.client._protocol import PART_HEADROOM_BYTES
from kvstore.errors import CapacityExhausted
from kvstore.keys import Namespace
from kvstore.server.blobs import blob_key
from tests.conftest import SMALL_LAYOUT

BLOB_TOKENS = list(range(100))
SMALL_LIMIT_BYTES = 256 << 10  # parts of 192 KiB less the tokens
PART_BYTES = part_size(SMALL_LIMIT_BYTES - PART_HEADROOM_BYTES, len(BLOB_TOKENS), MAX_PART_BYTES)


class CountingClient(Client):
    """A real client that counts blob round trips and refuses PutBlob after ``num_puts_ok``."""

    num_puts_ok = 1 << 30

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.num_puts = self.num_gets = 0

    def _put_one_blob(self, fields: Any, kind: str, data: Any) -> Any:
        if self.num_puts >= self.num_puts_ok:
            raise CapacityExhausted("injected: no tier holds it")
        self.num_puts += 1
        return (yield from super()._put_one_blob(fields, kind, data))

    def _get_one_blob(self, fields: Any, kind: str) -> Any:
        self.num_gets += 1
        return (yield from super()._get_one_blob(fields, kind))


@pytest.fixture
def small(server):
    """A counting client with a 256 KiB message limit."""
    with CountingClient(server.address, "model@rev", SMALL_LAYOUT,
                        max_message_bytes=SMALL_LIMIT_BYTES) as c:
        yield c


def _random_bytes(num_bytes: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, num_bytes, dtype=np.uint8).tobytes()


def _flip_byte(data: bytes) -> bytes:
    flipped = bytearray(data)
    flipped[len(flipped) // 2] ^= 0x40
    return bytes(flipped)


def _drop_blob(server: Any, tokens: list[int], kind: str) -> None:
    """Remove one blob from every tier, as an eviction would."""
    key = blob_key(Namespace("model@rev", SMALL_LAYOUT), np.asarray(tokens, dtype="<i4"),
                   kind.encode())
    assert server.engine.delete(key)


def _manifest_bytes(c: Client, kind: str) -> bytes:
    """A stored blob as it is, manifest or not (``get_blob`` would join the parts)."""
    return c._run(c._get_one_blob(_fields(), kind))


def _fields() -> dict[str, Any]:
    return {"tokens_le_i32": np.asarray(BLOB_TOKENS, "<i4").tobytes()}


def test_blob_that_fits_a_message_is_stored_whole_in_one_round_trip(small) -> None:
    data = _random_bytes(1000, seed=0)
    assert small.put_blob(BLOB_TOKENS, "k", data) is False
    assert small.get_blob(BLOB_TOKENS, "k") == data
    assert (small.num_puts, small.num_gets) == (1, 1)


def test_blob_over_the_message_limit_round_trips_in_parts(small) -> None:
    data = _random_bytes(500_000, seed=1)
    assert PART_BYTES == SMALL_LIMIT_BYTES - (64 << 10) - 4 * len(BLOB_TOKENS)
    small.put_blob(BLOB_TOKENS, "k", data)
    assert small.num_puts == 3 + 1  # three parts and the manifest
    manifest = PartManifest.from_bytes(_manifest_bytes(small, "k"))
    assert (manifest.total_bytes, manifest.part_bytes, manifest.num_parts) == (
        len(data), PART_BYTES, 3)
    assert [small.get_blob(BLOB_TOKENS, part_kind("k", i, 3)) for i in range(3)] == [
        data[:PART_BYTES], data[PART_BYTES : 2 * PART_BYTES], data[2 * PART_BYTES :]]
    assert small.get_blob(BLOB_TOKENS, "k") == data
    assert small.num_broken_blobs == 0


def test_blob_that_starts_like_a_manifest_round_trips(small) -> None:
    data = PARTS_MAGIC + _random_bytes(100, seed=5)  # stored whole it would parse as one
    small.put_blob(BLOB_TOKENS, "k", data)
    assert small.num_puts == 2 + 1
    assert small.get_blob(BLOB_TOKENS, "k") == data


def test_part_size_is_capped_and_refused_when_tokens_fill_the_message(client) -> None:
    assert part_size((64 << 20) - PART_HEADROOM_BYTES, 100, MAX_PART_BYTES) == MAX_PART_BYTES
    c = client(max_message_bytes=SMALL_LIMIT_BYTES)
    with pytest.raises(CapacityExhausted, match="40000 tokens leave"):
        c.put_blob(list(range(40_000)), "k", b"x")  # 160 KB of tokens in a 256 KiB message


def test_blob_with_a_missing_or_damaged_part_reads_as_a_miss(server, small) -> None:
    data = _random_bytes(500_000, seed=2)
    small.put_blob(BLOB_TOKENS, "k", data)
    good_part = small.get_blob(BLOB_TOKENS, part_kind("k", 1, 3))
    good_manifest = _manifest_bytes(small, "k")
    damages = [(part_kind("k", 1, 3), _flip_byte(good_part)),  # same length, other bytes
               (part_kind("k", 1, 3), good_part[:-1]),  # wrong size
               ("k", _flip_byte(good_manifest)),  # manifest fails its checksum
               ("k", PartManifest(len(data), PART_BYTES // 2, 6,
                                  PartManifest.from_bytes(good_manifest).blob_xxh3
                                  ).to_bytes())]  # a count of parts never written
    for num_broken, (kind, bad) in enumerate(damages, start=1):
        small._run(small._put_one_blob(_fields(), kind, bad))
        assert small.get_blob(BLOB_TOKENS, "k") is None
        assert small.num_broken_blobs == num_broken
        small.put_blob(BLOB_TOKENS, "k", data)
        assert small.get_blob(BLOB_TOKENS, "k") == data
    _drop_blob(server, BLOB_TOKENS, part_kind("k", 2, 3))
    assert small.get_blob(BLOB_TOKENS, "k") is None
    assert small.num_broken_blobs == len(damages) + 1


def test_put_that_fails_part_way_never_reads_as_a_mix_of_two_blobs(small) -> None:
    first, second = _random_bytes(500_000, seed=3), _random_bytes(500_000, seed=4)
    small.put_blob(BLOB_TOKENS, "k", first)
    small.num_puts_ok = small.num_puts + 2
    with pytest.raises(CapacityExhausted, match="injected"):
        small.put_blob(BLOB_TOKENS, "k", second)
    small.num_puts_ok = 1 << 30
    size = PART_BYTES
    stored = [small.get_blob(BLOB_TOKENS, part_kind("k", i, 3)) for i in range(3)]
    assert stored == [second[:size], second[size : 2 * size], first[2 * size :]]
    assert small.get_blob(BLOB_TOKENS, "k") is None  # the manifest of `first` rejects the mix
    assert small.num_broken_blobs == 1
    small.put_blob(BLOB_TOKENS, "k", second)  # the re-put replaces every part and the manifest
    assert small.get_blob(BLOB_TOKENS, "k") == second
