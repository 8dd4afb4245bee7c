"""The shared-memory arena: cross-process reads, leases against eviction, expiry."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
import xxhash

from kvstore.arena import ALIGN, Arena, ArenaReader, Extent
from kvstore.errors import NotFound
from kvstore.keys import ChunkKey


def _key(i: int) -> ChunkKey:
    return ChunkKey(i.to_bytes(32, "little"))


def _obj(i: int, size: int = 3 * ALIGN) -> bytes:
    return bytes([i % 251]) * size


def test_second_process_reads_leased_bytes_exactly() -> None:
    arena = Arena(1 << 20)
    try:
        payload = bytes(range(256)) * 100
        arena.put(_key(1), payload)
        lease, [extent] = arena.lease([_key(1)])
        script = (
            "import sys, xxhash\n"
            "from kvstore.arena import ArenaReader, Extent\n"
            f"r = ArenaReader({arena.path!r})\n"
            f"print(xxhash.xxh64(r.view(Extent({extent.offset}, {extent.length}))).hexdigest())\n"
        )
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                             check=True).stdout.strip()
        assert out == xxhash.xxh64(payload).hexdigest()
        arena.release(lease)
    finally:
        arena.close()


def test_lease_blocks_eviction_of_exactly_its_bytes() -> None:
    evicted: list[ChunkKey] = []
    arena = Arena(12 * ALIGN, on_evict=lambda k, _: evicted.append(k))
    try:
        for i in range(4):  # 4 x 3 pages fill the arena
            assert arena.put(_key(i), _obj(i))
        lease, _ = arena.lease([_key(0)])  # the LRU object, pinned
        assert arena.put(_key(10), _obj(10))
        assert arena.put(_key(11), _obj(11))
        assert evicted == [_key(1), _key(2)]  # LRU order, skipping the leased key 0
        assert arena.get(_key(0)) == _obj(0)
        arena.release(lease)
        assert arena.put(_key(12), _obj(12))
        assert evicted[-1] == _key(3)
        assert arena.put(_key(13), _obj(13))
        assert evicted[-1] == _key(10)  # key 0 was touched by get(): 10 is now LRU
        assert arena.put(_key(14), _obj(14)) and arena.put(_key(15), _obj(15))
        assert _key(0) in evicted  # unpinned: it goes in its LRU turn
    finally:
        arena.close()


def test_put_refused_when_every_byte_is_leased() -> None:
    arena = Arena(6 * ALIGN)
    try:
        arena.put(_key(0), _obj(0))
        arena.put(_key(1), _obj(1))
        arena.lease([_key(0), _key(1)])
        assert arena.put(_key(2), _obj(2)) is False
        assert arena.get(_key(0)) == _obj(0) and arena.get(_key(1)) == _obj(1)
    finally:
        arena.close()


def test_expired_lease_of_a_dead_client_frees_its_bytes() -> None:
    arena = Arena(6 * ALIGN, lease_ttl_s=0.05)
    try:
        arena.put(_key(0), _obj(0))
        arena.put(_key(1), _obj(1))
        arena.lease([_key(0), _key(1)])  # never released: the holder "died"
        time.sleep(0.1)
        assert arena.put(_key(2), _obj(2))
        assert arena.num_leases() == 0
        with pytest.raises(NotFound, match="not held"):
            arena.release(1)
    finally:
        arena.close()


def test_deleted_while_leased_keeps_bytes_until_release() -> None:
    arena = Arena(3 * ALIGN)
    try:
        arena.put(_key(0), _obj(0))
        lease, [extent] = arena.lease([_key(0)])
        assert arena.delete(_key(0))
        assert arena.get(_key(0)) is None
        assert arena.put(_key(1), _obj(1)) is False  # its bytes are still pinned
        reader = ArenaReader(arena.path)
        assert bytes(reader.view(extent)) == _obj(0)
        reader.close()
        arena.release(lease)
        assert arena.put(_key(1), _obj(1))
    finally:
        arena.close()


def test_lease_covers_only_leading_present_keys() -> None:
    arena = Arena(16 * ALIGN)
    try:
        arena.put(_key(0), _obj(0))
        arena.put(_key(2), _obj(2))
        _, extents = arena.lease([_key(0), _key(1), _key(2)])
        assert len(extents) == 1
    finally:
        arena.close()


def test_eviction_racing_leased_reads_never_tears() -> None:
    arena = Arena(40 * ALIGN)
    reader = ArenaReader(arena.path)
    stop = threading.Event()
    errors: list[str] = []

    def writer() -> None:
        i = 0
        while not stop.is_set():
            arena.put(_key(i), _obj(i, (1 + i % 5) * ALIGN))
            i += 1

    def read_loop() -> None:
        for _ in range(400):
            keys = arena.keys()[-3:]
            lease, extents = arena.lease(keys)
            for key, extent in zip(keys, extents, strict=False):
                data = bytes(reader.view(extent))
                if len(set(data)) != 1 or data[0] != int.from_bytes(key, "little") % 251:
                    errors.append(f"torn read of key {int.from_bytes(key, 'little')}")
            arena.release(lease)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        read_loop()
    finally:
        stop.set()
        thread.join()
        reader.close()
        arena.close()
    assert errors == []


def test_reader_rejects_extent_outside_arena() -> None:
    arena = Arena(4 * ALIGN)
    reader = ArenaReader(arena.path)
    try:
        with pytest.raises(Exception, match="outside the arena"):
            reader.view(Extent(reader.nbytes - ALIGN, 2 * ALIGN))
    finally:
        reader.close()
        arena.close()


def test_reader_of_missing_arena_is_not_found() -> None:
    with pytest.raises(NotFound):
        ArenaReader("/dev/shm/kvstore-arena-does-not-exist")



def test_arena_larger_than_its_tmpfs_fails_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """A DRAM tier that cannot get its pages is refused up front, not a SIGBUS later."""
    import errno
    import os

    from kvstore import arena_file
    from kvstore.errors import CapacityExhausted

    def full(fd: int, offset: int, length: int) -> None:  # /dev/shm is full (fake of the OS)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    before = set(os.listdir("/dev/shm"))
    monkeypatch.setattr(arena_file.os, "posix_fallocate", full)
    with pytest.raises(CapacityExhausted, match="cannot reserve"):
        Arena(64 * ALIGN)
    assert set(os.listdir("/dev/shm")) <= before  # no file left behind


def _mapped_rss_bytes(path: str) -> int:
    """Resident bytes of this process's mapping of ``path`` (from /proc/self/smaps)."""
    rss, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:  # a mapping line
                inside = fields[-1] == path
            elif inside and fields[0] == "Rss:":
                rss += int(fields[1]) * 1024
    return rss


def test_arena_pages_are_faulted_in_at_start() -> None:
    arena = Arena(64 << 20)
    try:
        deadline = time.monotonic() + 20
        while _mapped_rss_bytes(arena.path) < arena.file_bytes and time.monotonic() < deadline:
            time.sleep(0.05)
        # every page is mapped before any put wrote it: first writes take no faults
        assert _mapped_rss_bytes(arena.path) == arena.file_bytes
        assert arena.used_bytes == 0
    finally:
        arena.close()


def test_reservation_holds_space_until_committed_or_expired() -> None:
    from kvstore.arena import Placement

    evicted: list[ChunkKey] = []
    arena = Arena(12 * ALIGN, on_evict=lambda k, _: evicted.append(k), lease_ttl_s=0.2)
    try:
        for i in range(4):
            assert arena.put(_key(i), _obj(i))
        rid, extents = arena.reserve([3 * ALIGN, 3 * ALIGN])
        assert evicted == [_key(0), _key(1)]  # reserving evicts like a put
        assert arena.reserve([7 * ALIGN]) is None  # never fits beside the reservation
        assert arena.reservation_stats() == (1, 6 * ALIGN)
        assert arena.contains_many([_key(i) for i in range(4)]) == [False] * 4
        arena.claim_reservation(rid)
        for extent in extents:
            arena.writable_view(extent)[:] = _obj(7)
        arena.adopt(Placement(rid, 0), _key(7))  # indexed in place, pinned until finish
        assert arena.get(_key(7)) == _obj(7) and len(arena) == 1
        assert arena.put(_key(8), _obj(8)) and arena.put(_key(9), _obj(9))
        assert arena.put(_key(10), _obj(10)) and evicted[-1] == _key(8)  # 7 is pinned
        arena.finish_reservation(rid)  # extent 1 was not adopted: freed
        assert arena.reservation_stats() == (0, 0)
        assert arena.put(_key(11), _obj(11)) and evicted[-1] == _key(8)  # the freed extent
        rid, _ = arena.reserve([3 * ALIGN])
        time.sleep(0.25)
        assert arena.reservation_stats() == (0, 0)  # expired uncommitted: freed
        with pytest.raises(NotFound):
            arena.claim_reservation(rid)
    finally:
        arena.close()


def _resident_bytes(address: int) -> int:
    """Rss of this process's mapping that starts at ``address`` (/proc/self/smaps)."""
    lines = open("/proc/self/smaps").read().splitlines()
    for i, line in enumerate(lines):
        if line and not line[0].isupper() and int(line.split("-")[0], 16) == address:
            for field in lines[i + 1:]:
                if field.startswith("Rss:"):
                    return int(field.split()[1]) * 1024
    raise AssertionError(f"no mapping starts at {address:#x}")


def test_prefault_maps_every_page_with_the_gil_released(tmp_path) -> None:
    import mmap
    import os

    import numpy as np

    from kvstore.arena_file import create_file, prefault

    size = 128 << 20
    path, created, _ = create_file(str(tmp_path), size, hugepages=False)
    fd = os.open(path, os.O_RDONLY)
    mapped = mmap.mmap(fd, size, prot=mmap.PROT_READ)  # a client's fresh read-only mapping
    os.close(fd)
    address = np.frombuffer(mapped, np.uint8).ctypes.data
    try:
        assert _resident_bytes(address) < size // 4
        # One slice of the whole mapping: ~30+ ms in the kernel. Were the GIL held for
        # it, this thread would make no progress for that long.
        prefaulter = threading.Thread(target=prefault, args=(mapped,),
                                      kwargs={"slice_bytes": size, "writable": False})
        start = last = time.perf_counter()
        longest_gap = 0.0
        prefaulter.start()
        while prefaulter.is_alive():
            now = time.perf_counter()
            longest_gap, last = max(longest_gap, now - last), now
        took = time.perf_counter() - start
        assert _resident_bytes(address) == size
        assert longest_gap < max(took / 2, 0.005), (longest_gap, took)
    finally:
        mapped.close()
        created.close()
        os.unlink(path)


def test_a_reader_faults_in_the_slices_it_views_before_its_idle_prefault_does() -> None:
    import numpy as np

    arena = Arena(256 << 20)
    try:
        assert arena.prefaulted.wait(30)  # the daemon's own mapping is another VMA
        reader = ArenaReader(arena.path, nonce=arena.nonce)
        reader._stop_prefault.set()  # stop the background prefault where it got to
        reader._prefaulter.join()
        address = np.frombuffer(reader._view, np.uint8).ctypes.data
        # Read faults map neighbours too (fault-around: up to 64 KiB on either side).
        slack = 128 << 10

        def grew_by(before: int, want: int) -> bool:
            return want <= _resident_bytes(address) - before <= want + slack

        start = _resident_bytes(address)
        assert start <= 4096 + (4 << 20) * sum(reader._populated) + slack
        first = reader._populated.index(0) + 1  # two untouched slices: first, first + 1
        assert not reader._populated[first]
        slice_start = first * (4 << 20)
        reader.view(Extent(slice_start + (1 << 20), 1 << 20))
        assert grew_by(start, 4 << 20)
        after_one = _resident_bytes(address)
        reader.view(Extent(slice_start + (2 << 20), 2 << 20))  # same slice: nothing new
        assert _resident_bytes(address) == after_one
        reader.view(Extent(slice_start + (4 << 20) - 64, 128))  # straddles: one is new
        assert grew_by(start, 8 << 20)
        reader.close()

        whole = ArenaReader(arena.path, nonce=arena.nonce)  # left to its idle prefault
        whole._prefaulter.join(60)
        address = np.frombuffer(whole._view, np.uint8).ctypes.data
        assert _resident_bytes(address) >= whole.nbytes - slack
        whole.close()
        assert not whole._prefaulter.is_alive()
    finally:
        arena.close()
    assert not arena._prefaulter.is_alive()
