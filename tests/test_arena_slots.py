"""SlotTable: the slot and lease bookkeeping the DRAM arena and the GPU tier share.

Driven directly (no file, no device): the bytes live in a bytearray the test owns.
"""

from __future__ import annotations

import logging
import threading
import time

import pytest

from kvstore.arena_file import ALIGN
from kvstore.arena_slots import Slot, SlotTable, aligned
from kvstore.errors import NotFound
from kvstore.keys import ChunkKey


def _key(i: int) -> ChunkKey:
    return ChunkKey(i.to_bytes(32, "little"))


def _table(slots: int) -> tuple[SlotTable, bytearray]:
    region = bytearray(slots * ALIGN)
    table = SlotTable(slots * ALIGN, 0, lambda s: bytes(region[s.offset : s.offset + s.length]),
                      log=logging.getLogger("test"), name="test", lease_noun="lease")
    return table, region


def _put(table: SlotTable, region: bytearray, i: int, evicted: list) -> bool:
    offset = table.allocate(aligned(ALIGN), evicted, keep_evicting=True)
    if offset is None:
        return False
    region[offset : offset + ALIGN] = bytes([i]) * ALIGN
    assert table.insert(_key(i), Slot(offset, ALIGN))
    return True


def test_eviction_takes_the_least_recent_unleased_slot_and_keeps_it_readable() -> None:
    table, region = _table(3)
    evicted: list = []
    for i in range(3):
        assert _put(table, region, i, evicted)
    lease_id, slots = table.lease([_key(0)], ttl_s=60)  # key 0 is LRU but leased
    assert [s.offset for s in slots] == [0]
    table.touch(_key(1))  # order now 0 (leased), 2, 1
    assert _put(table, region, 3, evicted)
    assert evicted == [(_key(2), bytes([2]) * ALIGN)] and table.evictions == 1
    assert table.contains(_key(2))  # until its on_evict returns
    table.finish_evictions(evicted, None, threading.Lock())
    assert not table.contains(_key(2))
    assert list(table.index) == [_key(0), _key(1), _key(3)]
    table.release(lease_id)
    with pytest.raises(NotFound, match="lease .* is not held"):
        table.release(lease_id)


def test_deleted_while_leased_frees_on_the_last_unpin_and_expiry_unpins() -> None:
    table, region = _table(2)
    evicted: list = []
    assert _put(table, region, 0, evicted) and _put(table, region, 1, evicted)
    table.lease([_key(0), _key(1)], ttl_s=0.01)
    assert table.delete(_key(0)) and table.used_bytes == ALIGN
    assert table.allocate(ALIGN, evicted, keep_evicting=True) is None  # all pinned
    time.sleep(0.02)
    table.expire_leases()
    assert table.leases == {}
    assert table.allocate(ALIGN, evicted, keep_evicting=True) == 0  # key 0's freed space
    assert evicted == []
