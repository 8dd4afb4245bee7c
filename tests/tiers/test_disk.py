"""DiskTier: file layout, crash-safe writes, index rebuild, corruption and I/O faults."""

from __future__ import annotations

import errno
import os
import stat
import threading
from pathlib import Path

import pytest

from kvstore.codec.format import HEADER_BYTES
from kvstore.config import DiskTierConfig
from kvstore.keys import ChunkKey
from kvstore.tiers.base import Tier
from kvstore.tiers.disk import DiskTier
from kvstore.tiers.record import RECORD_BYTES, pack_record
from tests.fakes import flip_bit, make_key, make_object

OBJ_BYTES = len(make_object(seed=0))
FILE_BYTES = OBJ_BYTES + RECORD_BYTES  # an object file: the object, then its key record


def _tier(path: Path, num_objects: int = 64, *, fsync: bool = False) -> DiskTier:
    # fsync is off except where a test is about it: it only slows tests on ext4.
    return DiskTier(DiskTierConfig(path=str(path), capacity_bytes=num_objects * FILE_BYTES,
                                   fsync=fsync))


def _all_files(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())


def _evicted_by(tier: DiskTier, keys: list[ChunkKey], before: list[bool]) -> list[ChunkKey]:
    after = tier.contains_many(keys)
    return [k for k, b, a in zip(keys, before, after, strict=True) if b and not a]


def test_tier_implements_protocol_when_built(tmp_path: Path) -> None:
    tier = _tier(tmp_path)
    assert isinstance(tier, Tier)
    assert tier.name == "disk"
    assert tier.stats().info == {"io": "posix", "path": str(tmp_path), "fsync": "false"}


def test_get_returns_put_object_when_fsync_on(tmp_path: Path) -> None:
    tier = _tier(tmp_path, fsync=True)
    obj = make_object(seed=1)
    assert tier.put(make_key(1), obj)
    assert tier.get(make_key(1)) == obj
    stats = tier.stats()
    assert (stats.hits, stats.puts, stats.num_objects, stats.used_bytes) == (1, 1, 1, FILE_BYTES)


def test_object_file_named_by_key_when_put(tmp_path: Path) -> None:
    tier = _tier(tmp_path)
    key = make_key(7)
    tier.put(key, make_object(seed=7))
    hex_key = key.hex()
    assert _all_files(tmp_path) == [f"{hex_key[:2]}/{hex_key}.kvc"]
    obj = make_object(seed=7)
    assert (tmp_path / hex_key[:2] / f"{hex_key}.kvc").read_bytes() == obj + pack_record(key, obj)


def test_eviction_follows_lru_order_when_full(tmp_path: Path) -> None:
    tier = _tier(tmp_path, num_objects=3)
    keys = [make_key(i) for i in range(6)]
    evicted: list[ChunkKey] = []

    def put(i: int) -> None:
        before = tier.contains_many(keys)
        tier.put(keys[i], make_object(seed=i))
        evicted.extend(_evicted_by(tier, keys, before))

    for i in range(3):
        put(i)
    tier.get(keys[0])  # order: 1, 2, 0
    put(3)  # evicts 1
    put(2)  # present: refreshed, order 0, 3, 2
    put(4)  # evicts 0
    put(5)  # evicts 3
    assert evicted == [keys[1], keys[0], keys[3]]
    assert len(_all_files(tmp_path)) == 3
    stats = tier.stats()
    assert (stats.evictions, stats.num_objects, stats.used_bytes) == (3, 3, 3 * FILE_BYTES)


def test_put_refused_when_object_exceeds_capacity(tmp_path: Path) -> None:
    tier = DiskTier(DiskTierConfig(path=str(tmp_path), capacity_bytes=FILE_BYTES - 1, fsync=False))
    assert not tier.put(make_key(0), make_object(seed=0))
    assert _all_files(tmp_path) == []


def test_index_rebuilt_when_reopened(tmp_path: Path) -> None:
    first = _tier(tmp_path)
    for i in range(4):
        first.put(make_key(i), make_object(seed=i))
    # Another instance (another daemon run) on the same directory adds one more.
    _tier(tmp_path).put(make_key(4), make_object(seed=4))
    reopened = _tier(tmp_path)
    assert reopened.contains_many([make_key(i) for i in range(6)]) == [True] * 5 + [False]
    assert reopened.get(make_key(4)) == make_object(seed=4)
    assert reopened.get(make_key(0)) == make_object(seed=0)
    stats = reopened.stats()
    assert (stats.num_objects, stats.used_bytes) == (5, 5 * FILE_BYTES)


def test_reopened_index_orders_lru_by_mtime_when_shrunk(tmp_path: Path) -> None:
    tier = _tier(tmp_path)
    for i in range(4):
        tier.put(make_key(i), make_object(seed=i))
        path = tier.path_of(make_key(i))
        os.utime(path, ns=(10**18 + (4 - i) * 10**9,) * 2)  # key 0 newest, key 3 oldest
    reopened = _tier(tmp_path, num_objects=2)  # capacity shrank: the oldest two go
    keys = [make_key(i) for i in range(4)]
    assert reopened.contains_many(keys) == [True, True, False, False]
    assert len(_all_files(tmp_path)) == 2


def test_leftover_temp_files_removed_when_opened(tmp_path: Path) -> None:
    tier = _tier(tmp_path)
    key = make_key(1)
    tier.put(key, make_object(seed=1))
    final = Path(tier.path_of(key))
    (final.parent / f"{final.name}.tmp-deadbeef").write_bytes(b"half an obj")
    (final.parent / f"{make_key(2).hex()}.kvc.tmp-0123").write_bytes(b"")
    reopened = _tier(tmp_path)
    assert _all_files(tmp_path) == [str(final.relative_to(tmp_path))]
    assert reopened.get(key) == make_object(seed=1)
    assert reopened.stats().num_objects == 1


def _flip_payload(data: bytes) -> bytes:
    return flip_bit(data, len(data) - RECORD_BYTES - 5, bit=3)


def _flip_record(data: bytes) -> bytes:
    return flip_bit(data, len(data) - 20)  # inside the record's object length


def _flip_header(data: bytes) -> bytes:
    return flip_bit(data, 17)  # inside num_tokens: only the checksum can catch it


def _truncate(data: bytes) -> bytes:
    return data[: len(data) - 100]


def _truncate_to_header(data: bytes) -> bytes:
    return data[: HEADER_BYTES - 1]


def _strip_record(data: bytes) -> bytes:
    return data[:-RECORD_BYTES]  # a file written before key records existed


@pytest.mark.parametrize("damage", [_flip_payload, _flip_header, _truncate, _truncate_to_header,
                                    _flip_record, _strip_record])
def test_damaged_object_is_dropped_miss_when_read(tmp_path: Path, damage) -> None:
    tier = _tier(tmp_path)
    for i in range(3):
        tier.put(make_key(i), make_object(seed=i))
    path = Path(tier.path_of(make_key(1)))
    path.write_bytes(damage(path.read_bytes()))
    assert tier.get(make_key(1)) is None
    assert not path.exists()
    stats = tier.stats()
    assert (stats.corrupt, stats.misses, stats.num_objects) == (1, 1, 2)
    assert stats.used_bytes == 2 * FILE_BYTES
    assert tier.contains_many([make_key(1)]) == [False]
    # The tier keeps serving the other keys, and takes the damaged key again.
    assert tier.get(make_key(0)) == make_object(seed=0)
    assert tier.get(make_key(2)) == make_object(seed=2)
    assert tier.put(make_key(1), make_object(seed=1))
    assert tier.get(make_key(1)) == make_object(seed=1)


def test_corrupt_object_is_miss_when_read_after_reopen(tmp_path: Path) -> None:
    tier = _tier(tmp_path)
    tier.put(make_key(0), make_object(seed=0))
    path = Path(tier.path_of(make_key(0)))
    path.write_bytes(_flip_payload(path.read_bytes()))
    reopened = _tier(tmp_path)  # indexing does not read files...
    assert reopened.contains_many([make_key(0)]) == [True]
    assert reopened.get(make_key(0)) is None  # ...the read verifies
    assert reopened.stats().corrupt == 1
    assert not path.exists()


def test_put_evicts_then_fails_when_disk_full(tmp_path: Path, monkeypatch) -> None:
    tier = _tier(tmp_path)
    tier.put(make_key(0), make_object(seed=0))
    real_write = os.write
    calls = {"n": 0}

    def write_until_full(fd: int, data) -> int:
        # The first write lands partially, then the device is full: a partial temp file.
        calls["n"] += 1
        if calls["n"] == 1:
            return real_write(fd, bytes(data)[:100])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", write_until_full)
    assert not tier.put(make_key(1), make_object(seed=1))
    monkeypatch.undo()
    assert calls["n"] == 3  # full; key 0 evicted to make room; still full: refused
    assert _all_files(tmp_path) == []
    stats = tier.stats()
    assert (stats.errors, stats.evictions, stats.num_objects, stats.used_bytes) == (1, 1, 0, 0)
    assert tier.contains_many([make_key(1)]) == [False]
    # Once space is back, the same put works.
    assert tier.put(make_key(1), make_object(seed=1))
    assert tier.get(make_key(1)) == make_object(seed=1)


def test_put_returns_false_when_fsync_fails(tmp_path: Path, monkeypatch) -> None:
    tier = _tier(tmp_path, fsync=True)
    real_fsync = os.fsync

    def failing_fsync(fd: int) -> None:
        if stat.S_ISREG(os.fstat(fd).st_mode):  # the object file's fsync, not a directory's
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    assert not tier.put(make_key(0), make_object(seed=0))
    monkeypatch.undo()
    assert not any(".tmp-" in f or f.endswith(".kvc") for f in _all_files(tmp_path))
    assert tier.stats().errors == 1


def test_get_is_miss_when_read_fails(tmp_path: Path, monkeypatch) -> None:
    tier = _tier(tmp_path)
    tier.put(make_key(0), make_object(seed=0))

    def failing_read(fd: int, n: int) -> bytes:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "read", failing_read)
    assert tier.get(make_key(0)) is None
    monkeypatch.undo()
    stats = tier.stats()
    assert (stats.errors, stats.misses, stats.corrupt) == (1, 1, 0)
    # An I/O error may be transient: the file stays and serves the next read.
    assert tier.get(make_key(0)) == make_object(seed=0)


def test_get_is_miss_when_file_removed_behind_back(tmp_path: Path) -> None:
    tier = _tier(tmp_path)
    tier.put(make_key(0), make_object(seed=0))
    os.unlink(tier.path_of(make_key(0)))
    assert tier.get(make_key(0)) is None
    assert tier.contains_many([make_key(0)]) == [False]
    assert tier.stats().used_bytes == 0


def test_delete_removes_file_when_present(tmp_path: Path) -> None:
    tier = _tier(tmp_path)
    tier.put(make_key(0), make_object(seed=0))
    assert tier.delete(make_key(0))
    assert not tier.delete(make_key(0))
    assert _all_files(tmp_path) == []
    assert tier.stats().used_bytes == 0


def test_reads_never_torn_when_threads_race(tmp_path: Path) -> None:
    tier = _tier(tmp_path, num_objects=6)
    objects = [make_object(seed=i) for i in range(12)]
    wrong: list[int] = []

    def worker(offset: int) -> None:
        for n in range(60):
            i = (n * 5 + offset) % 12
            tier.put(make_key(i), objects[i])
            j = (i + offset) % 12
            got = tier.get(make_key(j))
            if got is not None and got != objects[j]:
                wrong.append(j)
            if n % 7 == 0:
                tier.delete(make_key(j))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = tier.stats()
    assert not wrong
    assert stats.corrupt == stats.errors == 0
    assert stats.used_bytes == stats.num_objects * FILE_BYTES <= 6 * FILE_BYTES
    files = _all_files(tmp_path)
    assert len(files) == stats.num_objects
    assert not any(".tmp-" in f for f in files)


def test_put_recreates_directory_when_removed_behind_back(tmp_path: Path) -> None:
    tier = _tier(tmp_path)
    tier.put(make_key(0), make_object(seed=0))
    tier.delete(make_key(0))
    os.rmdir(os.path.dirname(tier.path_of(make_key(0))))
    assert tier.put(make_key(0), make_object(seed=0))
    assert tier.get(make_key(0)) == make_object(seed=0)


def test_copied_object_file_is_corrupt_miss_not_other_chunk(tmp_path: Path) -> None:
    # Issue #17 item 1: a valid object file copied over another chunk's file must
    # not be served as that other chunk.
    tier = _tier(tmp_path)
    tier.put(make_key(1), make_object(seed=1))
    tier.put(make_key(2), make_object(seed=2))
    Path(tier.path_of(make_key(2))).write_bytes(Path(tier.path_of(make_key(1))).read_bytes())
    assert tier.get(make_key(2)) is None
    stats = tier.stats()
    assert (stats.corrupt, stats.misses, stats.hits) == (1, 1, 0)
    assert not Path(tier.path_of(make_key(2))).exists()
    assert tier.get(make_key(1)) == make_object(seed=1)  # the original is untouched


def test_object_files_private_when_written(tmp_path: Path) -> None:
    # Issue #17 item 6: 0600 files in 0700 directories, whatever the umask.
    old_umask = os.umask(0o022)
    try:
        tier = _tier(tmp_path / "store")
        tier.put(make_key(1), make_object(seed=1))
    finally:
        os.umask(old_umask)
    path = Path(tier.path_of(make_key(1)))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "store").stat().st_mode) == 0o700


def test_object_files_made_private_when_reopened(tmp_path: Path) -> None:
    tier = _tier(tmp_path)
    tier.put(make_key(1), make_object(seed=1))
    path = Path(tier.path_of(make_key(1)))
    path.chmod(0o644)  # as older versions wrote them
    path.parent.chmod(0o755)
    reopened = _tier(tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert reopened.get(make_key(1)) == make_object(seed=1)


def test_failed_writes_logged_once_per_burst(tmp_path: Path, caplog) -> None:
    # Issue #17 item 7: a disk that fails every put logs one line, not one per put.
    tier = _tier(tmp_path)
    blocker = tmp_path / make_key(1).hex()[:2]
    blocker.write_bytes(b"")  # a file where the subdirectory must go: every create fails
    with caplog.at_level("WARNING", logger="kvstore.tiers.disk"):
        results = [tier.put(make_key(1), make_object(seed=1)) for _ in range(20)]
    assert results == [False] * 20
    assert tier.stats().errors == 20
    lines = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(lines) == 1, [r.getMessage() for r in lines]
