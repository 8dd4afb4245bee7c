"""The placement engine: write policy, promotion, demotion and lookup over the tiers.

Tiers are ordered fastest first. ``tiers[0]`` is the DRAM tier (a `CpuTier`), the
one every put and every promotion lands in. ``tiers[1]``, when present, is the
*backing* tier (the disk): under ``write-back`` a put only marks the chunk dirty and
a flusher thread writes dirty chunks to the backing tier every
``flush_interval_s``; under ``write-through`` the put writes it synchronously.
Whatever the policy, a chunk evicted from DRAM that the backing tier lacks is
written there on eviction (DRAM's ``on_evict`` is wired to `Engine._demote`), so a
chunk is lost only when the backing tier cannot hold it.

Write-back keeps its promise (a put acknowledged at t is on the backing tier by
t + ``flush_interval_s``) under load: four flusher threads write dirty chunks oldest
first, each an eighth of the interval after its put (at once while a put waits; a
chunk deleted sooner never costs a disk write), and a put waits before it is stored
while that delay plus the time the flushers need for the backlog (dirty chunks times
the measured seconds per write, over the flushers) would exceed half the interval,
or the oldest dirty chunk is already that old. So a kill -9 loses at most the puts of the
last interval, and puts slow to the disk's pace instead of outrunning it. Under
``write-through`` a put is acknowledged only once the backing tier holds it; a
refusal (a full disk that eviction cannot make room on, an I/O error) fails the put
with `CapacityExhausted`.

Tiers named in ``write_through_tiers`` (the shared Redis tier) receive every put
synchronously, whatever the policy; a slower tier is added by appending it to the
tier list and, if it should receive puts, naming it there.

The GPU tier (``gpu``, optional) sits above DRAM as an inclusive cache of raw
chunks: a chunk enters HBM when it has been read ``tiers.gpu.promote_after_hits``
times (0: on put), or when a same-host client leases it for device output
(``promote_to_gpu``); the GPU tier's LRU evicts within its slab and a victim no
lower tier holds is demoted into DRAM (`Engine._demote_gpu`). Reads prefer DRAM
(host bytes, no device copy) and fall back to HBM before the disk.

Locking: each tier is thread-safe on its own. Operations that must not interleave
with a delete of the same key (demotion, flushing, undoing a racing promotion) hold
a per-key striped lock. No key lock is ever held while calling ``CpuTier.put``,
because that call may run ``_demote`` for another key in the same thread; hence no
thread ever holds two key locks and the stripes cannot deadlock.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Collection, Sequence

from kvstore.arena_file import Placement
from kvstore.codec.format import verify_object
from kvstore.config import Config, EngineConfig, RedisTierConfig
from kvstore.errors import CapacityExhausted, Corrupt, InvalidArgument, Unavailable
from kvstore.keys import ChunkKey
from kvstore.quotas import TenantQuotas, TenantUsage
from kvstore.tiers.base import Tier, TierStats
from kvstore.tiers.cpu import CpuTier
from kvstore.tiers.disk import DiskTier
from kvstore.tiers.gpu import GpuTier
from kvstore.tiers.gpu_cuda import open_gpu_tier
from kvstore.tiers.redis import RedisTier
from kvstore.tiers.tombstones import TOMBSTONE_FILE_NAME

logger = logging.getLogger(__name__)

_NUM_KEY_STRIPES = 64  # striped key locks: plenty for a thread pool of tens
_MAX_HIT_COUNTS = 1 << 16  # keys whose gets are counted toward GPU promotion (LRU)
# Flusher threads: fsync'd writes overlap on a real device (write-through puts get
# that for free from the server's I/O threads), so one flusher would cap write-back
# below write-through.
_NUM_FLUSHERS = 4
# A dirty chunk waits this fraction of flush_interval_s before a flusher writes it
# (unless puts are waiting for room): a chunk deleted sooner never costs a write.
_FLUSH_DELAY = 1 / 8
# Seconds per backing write assumed before the flusher has timed one (a slow, fsyncing
# disk): a fresh daemon admits a few chunks per interval until it knows better.
_INITIAL_WRITE_S = 0.05
_SLOWER_WEIGHT = 0.5  # weight of a write slower than the moving average
_FASTER_WEIGHT = 0.2  # weight of a faster one


def _with_tombstone_file(config: Config) -> RedisTierConfig:
    """The Redis tier's config, its tombstone log defaulting to the disk tier's directory
    (state that must outlive the daemon, as the disk's files do)."""
    redis_config = config.tiers.redis
    if redis_config.tombstone_file is None and config.tiers.disk.enabled:
        path = os.path.join(config.tiers.disk.path, TOMBSTONE_FILE_NAME)
        redis_config = dataclasses.replace(redis_config, tombstone_file=path)
    return redis_config


def _num_leading(present: Sequence[bool]) -> int:
    for i, is_present in enumerate(present):
        if not is_present:
            return i
    return len(present)


class Engine:
    """Places KVC1 objects across tiers; every public method is thread-safe."""

    def __init__(
        self,
        config: EngineConfig,
        tiers: Sequence[Tier],
        *,
        write_through_tiers: Collection[str] = (),
        quotas: TenantQuotas | None = None,
        gpu: GpuTier | None = None,
    ) -> None:
        """Args:
        config: write policy and flush interval.
        quotas: per-tenant byte quotas; None = no tenant is limited.
        tiers: fastest first; ``tiers[0]`` must be a `CpuTier` whose ``on_evict`` is
            unset: the engine takes it over to demote evicted chunks.
        write_through_tiers: names of tiers below DRAM that get every put synchronously.
        gpu: the HBM tier above DRAM, or None; the engine takes over its ``on_evict``.

        Raises:
            InvalidArgument: on a tier list or config the engine cannot work with.
        """
        self._check_tiers(config, tiers, write_through_tiers)
        self._config = config
        self._tiers: list[Tier] = list(tiers)
        self._quotas = quotas
        cpu = tiers[0]
        assert isinstance(cpu, CpuTier)  # checked above
        self._cpu = cpu
        self._backing: Tier | None = self._tiers[1] if len(self._tiers) > 1 else None
        sync = set(write_through_tiers)
        if config.write_policy == "write-through" and self._backing is not None:
            sync.add(self._backing.name)
        self._sync_names = frozenset(sync)
        # Dirty = in DRAM, not yet written to the backing tier (write-back only):
        # key -> time.monotonic() of its put (None: not timed). A dict keeps insertion
        # order, so chunks are flushed oldest first.
        self._dirty: dict[ChunkKey, float | None] = {}
        self._dirty_lock = threading.Lock()
        # Signalled when a chunk becomes dirty (wakes the flusher) or is flushed
        # (wakes puts waiting for the backlog to shrink).
        self._dirty_changed = threading.Condition(self._dirty_lock)
        self._write_s = _INITIAL_WRITE_S  # moving average of seconds per backing write
        self._num_put_waits = 0  # puts that waited for the flusher (write-back backpressure)
        self._num_waiting = 0  # puts waiting for the flusher right now
        self._key_locks = [threading.Lock() for _ in range(_NUM_KEY_STRIPES)]
        self._num_deletes = 0  # bumped by delete(); lets promotions detect a racing delete
        self._closed = False
        self._close_lock = threading.Lock()
        self._stop = threading.Event()
        self._cpu.on_evict = self._demote
        self._gpu = gpu
        self._gpu_hits: OrderedDict[ChunkKey, int] = OrderedDict()  # gets since last promotion
        self._gpu_hits_lock = threading.Lock()
        if gpu is not None:
            gpu.on_evict = self._demote_gpu
        self._in_flush: set[ChunkKey] = set()  # dirty keys a flusher is writing now
        self._flushers: list[threading.Thread] = []
        if self._is_write_back:
            self._flushers = [threading.Thread(target=self._flush_loop, name=f"kvstore-flusher-{i}",
                                               daemon=True) for i in range(_NUM_FLUSHERS)]
            for flusher in self._flushers:
                flusher.start()

    @staticmethod
    def _check_tiers(
        config: EngineConfig, tiers: Sequence[Tier], write_through_tiers: Collection[str]
    ) -> None:
        if not tiers or not isinstance(tiers[0], CpuTier):
            raise InvalidArgument("the engine's first tier must be a CpuTier (DRAM)")
        if tiers[0].on_evict is not None:
            raise InvalidArgument("the CpuTier given to the engine already has an on_evict "
                                  "callback; the engine owns DRAM eviction, leave it unset")
        names = [t.name for t in tiers]
        if len(set(names)) != len(names):
            raise InvalidArgument(f"tier names must be unique, got {names}")
        unknown = set(write_through_tiers) - set(names[1:])
        if unknown:
            raise InvalidArgument(f"write_through_tiers names {sorted(unknown)}, which are not "
                                  f"tiers below DRAM; tiers are {names}")
        if config.flush_interval_s <= 0:
            raise InvalidArgument(
                f"engine.flush_interval_s must be > 0, got {config.flush_interval_s}"
            )

    @classmethod
    def from_config(cls, config: Config) -> Engine:
        """The engine of a daemon: DRAM, then disk (if enabled), then Redis (if configured)."""
        tiers: list[Tier] = [CpuTier(config.tiers.cpu)]
        write_through: set[str] = set()
        if config.tiers.disk.enabled:
            tiers.append(DiskTier(config.tiers.disk))
        if config.tiers.redis.url:  # the shared tier goes last, below the disk
            tiers.append(RedisTier(_with_tombstone_file(config)))
            if config.tiers.redis.write_through:
                write_through.add("redis")
        quotas = TenantQuotas(config.tenants)
        return cls(config.engine, tiers, write_through_tiers=write_through, quotas=quotas,
                   gpu=open_gpu_tier(config.tiers.gpu))

    @property
    def dram(self) -> CpuTier:
        """The DRAM tier (its arena serves same-host clients' leases)."""
        return self._cpu

    @property
    def gpu(self) -> GpuTier | None:
        """The HBM tier (its slab serves same-host clients' GPU leases), or None."""
        return self._gpu

    def _all_tiers(self) -> list[Tier]:
        """Every tier fastest first: the GPU tier (if any), then DRAM and below."""
        return ([self._gpu] if self._gpu is not None else []) + self._tiers

    @property
    def tiers(self) -> tuple[Tier, ...]:
        """The tiers, fastest first."""
        return tuple(self._tiers)

    def tenant_usage(self) -> dict[str, TenantUsage]:
        """Bytes stored and quota figures per tenant ({} without quotas)."""
        return {} if self._quotas is None else self._quotas.usage()

    def _stored_mask(self, keys: Sequence[ChunkKey]) -> list[bool]:
        """Which ``keys`` some tier holds (one contains_many per tier)."""
        present = [tier.contains_many(keys) for tier in self._tiers]
        return [any(column) for column in zip(*present, strict=True)] if keys else []

    @property
    def _is_write_through(self) -> bool:
        backing = self._backing
        return backing is not None and backing.name in self._sync_names

    @property
    def _is_write_back(self) -> bool:
        backing = self._backing
        return backing is not None and backing.name not in self._sync_names

    # -- reads --------------------------------------------------------------------

    def lookup(self, keys: Sequence[ChunkKey]) -> tuple[int, dict[str, int]]:
        """How many leading ``keys`` are stored: in any tier, and per tier by name."""
        self._check_open()
        tiers = self._all_tiers()
        present = [tier.contains_many(keys) for tier in tiers]
        names = [tier.name for tier in tiers]
        per_tier = {name: _num_leading(p) for name, p in zip(names, present, strict=True)}
        in_any = [any(column) for column in zip(*present, strict=True)]
        return _num_leading(in_any), per_tier

    def contains(self, key: ChunkKey) -> bool:
        self._check_open()
        return any(tier.contains_many([key])[0] for tier in self._all_tiers())

    def get(self, key: ChunkKey) -> bytes | None:
        """The object under ``key`` from the fastest tier holding it, or None.

        A hit below DRAM is promoted into DRAM (and a hit below the disk into the disk).
        """
        self._check_open()
        deletes_before = self._num_deletes
        obj = self._cpu.get(key)
        if obj is None and self._gpu is not None:
            obj = self._gpu.get(key)
            if obj is not None:
                return obj
        if obj is None:
            obj = self._get_below_dram(key)
        if obj is not None and self._gpu is not None and self._is_hot(key):
            self._place_in_gpu(key, obj, deletes_before)
        return obj

    def _get_below_dram(self, key: ChunkKey) -> bytes | None:
        deletes_before = self._num_deletes
        for level in range(1, len(self._tiers)):
            obj = self._tiers[level].get(key)
            if obj is not None:
                self._promote(key, obj, level, deletes_before)
                return obj
        return None

    def _promote(self, key: ChunkKey, obj: bytes, level: int, deletes_before: int) -> None:
        promoted: list[Tier] = []
        if level > 1 and self._backing is not None and self._backing.put(key, obj):
            promoted.append(self._backing)
        if self._cpu.put(key, obj):
            promoted.append(self._cpu)
        if self._num_deletes == deletes_before:
            return
        # A delete ran while we copied: if it was this key, undo the copies we made
        # (the source no longer has it and no new put made it dirty).
        with self._key_lock(key):
            source = self._tiers[level]
            if not source.contains_many([key])[0] and not self._is_dirty(key):
                for tier in promoted:
                    tier.delete(key)

    def prefetch(self, keys: Sequence[ChunkKey]) -> tuple[int, int]:
        """Promote the leading present ``keys`` into DRAM.

        Returns:
            (promoted, already resident); stops at the first key absent everywhere.
        """
        self._check_open()
        resident = self._cpu.contains_many(keys)
        num_promoted = num_resident = 0
        for key, is_resident in zip(keys, resident, strict=True):
            if is_resident:
                num_resident += 1
            elif self._get_below_dram(key) is not None:
                num_promoted += 1
            else:
                break
        return num_promoted, num_resident

    # -- writes -------------------------------------------------------------------

    def put(self, key: ChunkKey, obj: bytes | memoryview, tenant: str | None = None, *,
            placed: Placement | None = None) -> bool:
        """Store ``obj`` under ``key`` according to the write policy.

        Under write-back the call may wait first for the flusher (see the module
        docstring); under write-through it returns only once the backing tier holds
        the object.

        Args:
            tenant: whose object it is (its bytes count against that tenant's quota).
            placed: ``obj`` is a view of reserved DRAM arena space a same-host client
                wrote (``server/local.py``); DRAM indexes it in place, and the tiers
                below get the same view (pinned until the commit ends): no byte is copied.

        Returns:
            True if newly stored; False if some tier already held the key (objects
            are content-addressed, so it is not rewritten).

        Raises:
            CapacityExhausted: every tier refused the object, (write-through) the
                backing tier did, or the tenant is over its quota and
                ``tenants.over_quota`` refuses.
        """
        self._check_open()
        if self.contains(key):
            return False
        if tenant is None or self._quotas is None:
            return self._put_new(key, obj, placed)
        self._quotas.admit(tenant, key, len(obj), stored=self._stored_mask, delete=self.delete)
        try:
            return self._put_new(key, obj, placed)
        except BaseException:
            self._quotas.forget(key)
            raise

    def _put_new(self, key: ChunkKey, obj: bytes | memoryview,
                 placed: Placement | None) -> bool:
        self._wait_for_flusher()
        self._check_open()
        in_dram = self._cpu.put(key, obj, placed=placed)
        num_stored = int(in_dram)
        for tier in self._tiers[1:]:
            # Too big for DRAM: the backing tier takes it now, whatever the policy.
            if tier.name in self._sync_names or (tier is self._backing and not in_dram):
                is_stored = tier.put(key, obj)
                if not is_stored and tier is self._backing and self._is_write_through:
                    self._refuse_not_durable(key, obj)
                num_stored += is_stored
        if num_stored == 0:
            capacities = ", ".join(f"{s.name}={s.capacity_bytes}" for s in self.stats())
            raise CapacityExhausted(
                f"no tier accepted chunk {key.hex()[:16]}… of {len(obj)} bytes (capacity_bytes: "
                f"{capacities}); a tier was too small or failed to write — raise its "
                f"capacity_bytes, store smaller chunks, or check the daemon log"
            )
        if in_dram and self._is_write_back:
            with self._dirty_changed:
                self._dirty[key] = time.monotonic()
                self._dirty_changed.notify_all()
        if self._gpu is not None and self._gpu.promote_after_hits == 0:
            self._gpu.put(key, obj)  # a refusal (not raw, room leased) only costs speed
        return True

    def _refuse_not_durable(self, key: ChunkKey, obj: bytes) -> None:
        """Write-through: the backing tier refused a put; undo DRAM's copy and fail it."""
        with self._key_lock(key):
            self._cpu.delete(key)
        assert self._backing is not None
        raise CapacityExhausted(
            f"write-through: the {self._backing.name} tier did not store chunk "
            f"{key.hex()[:16]}… of {len(obj)} bytes (full even after evicting, or an I/O "
            f"error: see the daemon log); the put is not acknowledged"
        )

    def _wait_for_flusher(self) -> None:
        """Write-back backpressure: wait while the dirty backlog would outlive its budget.

        The budget is half of ``flush_interval_s``: the chunk about to be put joins the
        end of the backlog, which the flushers start after the flush delay and write
        oldest first at ``_write_s`` per chunk each; the other half of the interval
        absorbs error in that estimate and the scheduling of threads.
        """
        if not self._is_write_back:
            return
        budget_s = self._config.flush_interval_s / 2
        with self._dirty_changed:
            if self._has_room_locked(budget_s):
                return
            self._num_put_waits += 1
            self._num_waiting += 1
            self._dirty_changed.notify_all()  # the flusher stops delaying
            try:
                while not self._has_room_locked(budget_s):
                    self._dirty_changed.wait(timeout=budget_s / 8)
            finally:
                self._num_waiting -= 1

    def _has_room_locked(self, budget_s: float) -> bool:
        """Whether one more dirty chunk would still be flushed within ``budget_s``."""
        if self._closed or not self._dirty:
            return True
        oldest = next(iter(self._dirty.values()))
        is_fresh = oldest is None or time.monotonic() - oldest < budget_s
        delay_s = self._config.flush_interval_s * _FLUSH_DELAY  # before a flusher starts
        drain_s = (len(self._dirty) + 1) * self._write_s / _NUM_FLUSHERS
        return is_fresh and delay_s + drain_s <= budget_s

    def delete(self, key: ChunkKey) -> bool:
        """Remove ``key`` from every tier; True if any tier held it.

        A Redis delete that Redis cannot confirm yet (its master is down) leaves a
        tombstone in the Redis tier: the key is a miss there until the retried delete
        is confirmed, so an acknowledged delete survives a failover.

        Raises:
            Unavailable: the Redis tier could not record that tombstone.
        """
        self._check_open()
        with self._key_lock(key):
            with self._dirty_lock:  # also guards the counter: deletes of other keys race here
                self._num_deletes += 1
                self._dirty.pop(key, None)
            found = [tier.delete(key) for tier in self._all_tiers()]
        with self._gpu_hits_lock:
            self._gpu_hits.pop(key, None)
        if self._quotas is not None:
            self._quotas.forget(key)
        return any(found)

    def flush(self) -> None:
        """Write every dirty DRAM chunk to the backing tier now."""
        with self._dirty_lock:
            pending = list(self._dirty)
        for key in pending:
            self._flush_one(key)

    def _flush_one(self, key: ChunkKey) -> None:
        """Write one dirty chunk to the backing tier (timed) and mark it clean."""
        try:
            # The backing tier writes straight from the arena: no copy of the object.
            with self._key_lock(key), self._cpu.pinned(key) as obj:
                if obj is not None:
                    started = time.monotonic()
                    if self._write_backing(key, obj):
                        self._time_write(time.monotonic() - started)
        finally:
            with self._dirty_changed:
                self._dirty.pop(key, None)
                self._in_flush.discard(key)
                self._dirty_changed.notify_all()

    def _time_write(self, elapsed_s: float) -> None:
        """Fold one backing write's duration into ``_write_s``: a slower write moves it
        halfway at once (backpressure must follow a slowing disk within a write or
        two; the budget's other half absorbs the rest), a faster one gradually."""
        weight = _SLOWER_WEIGHT if elapsed_s > self._write_s else _FASTER_WEIGHT
        self._write_s += weight * (elapsed_s - self._write_s)

    def drop_corrupt(self, key: ChunkKey, obj: bytes) -> None:
        """A caller found ``obj``, just read under ``key``, unusable: drop the bad copies.

        A copy that fails its checksum can only have come from DRAM (every lower tier
        verifies what it reads), so only DRAM's copy goes and a good disk or Redis
        copy is read on the next get. A copy that passes its checksum but does not
        decode is the same bytes in every tier (all came from one verified put): every
        copy goes.
        """
        try:
            verify_object(obj)
        except Corrupt:
            with self._key_lock(key):
                self._cpu.delete(key)
            logger.warning("dropped a corrupt DRAM copy of chunk %s; lower tiers keep theirs",
                           key.hex()[:16])
            return
        self.delete(key)

    def _demote(self, key: ChunkKey, obj: bytes) -> None:
        """DRAM's on_evict: keep the chunk in the backing tier unless it is there already."""
        with self._key_lock(key):
            # CpuTier keeps an object visible until this returns; absent means a
            # delete ran meanwhile, and writing it now would resurrect it.
            if self._cpu.contains_many([key])[0]:
                self._write_backing(key, obj)
            with self._dirty_lock:
                self._dirty.pop(key, None)

    def _write_backing(self, key: ChunkKey, obj: bytes) -> bool:
        """Write to the backing tier unless it holds the key; True if it wrote now."""
        backing = self._backing
        if backing is None or backing.contains_many([key])[0]:
            return False
        if not backing.put(key, obj):
            # The tier logged why (too big, I/O error); DRAM's copy is now the only one.
            logger.debug("%s tier refused chunk %s", backing.name, key.hex())
            return False
        return True

    def _flush_loop(self) -> None:
        """Write dirty chunks oldest first, each once it is an eighth of the interval
        old (at once while puts wait for room)."""
        delay_s = self._config.flush_interval_s * _FLUSH_DELAY
        while not self._stop.is_set():
            with self._dirty_changed:
                item = next(((k, t) for k, t in self._dirty.items() if k not in self._in_flush),
                            None)
                if item is None:
                    self._dirty_changed.wait(timeout=self._config.flush_interval_s)
                    continue
                key, since = item
                wait_s = 0.0 if since is None else since + delay_s - time.monotonic()
                if wait_s > 0 and not self._num_waiting:
                    self._dirty_changed.wait(timeout=wait_s)
                    continue
                self._in_flush.add(key)
            try:
                self._flush_one(key)
            except Exception:
                # Keep flushing; a tier bug must not end write-back silently.
                logger.exception("write-back flush of chunk %s failed", key.hex()[:16])

    # -- the GPU tier -----------------------------------------------------------------

    def _is_hot(self, key: ChunkKey) -> bool:
        """Count a get of ``key``; True once it reached the GPU tier's promotion threshold."""
        assert self._gpu is not None
        with self._gpu_hits_lock:
            hits = self._gpu_hits.pop(key, 0) + 1
            if hits >= self._gpu.promote_after_hits:
                return True
            self._gpu_hits[key] = hits
            if len(self._gpu_hits) > _MAX_HIT_COUNTS:
                self._gpu_hits.popitem(last=False)
        return False

    def _place_in_gpu(self, key: ChunkKey, obj: bytes, deletes_before: int) -> bool:
        assert self._gpu is not None
        if not self._gpu.put(key, obj):
            return False
        if self._num_deletes != deletes_before and not self._held_below_gpu(key):
            self._gpu.delete(key)  # deleted while we copied: do not resurrect it in HBM
            return False
        return True

    def _held_below_gpu(self, key: ChunkKey) -> bool:
        return any(tier.contains_many([key])[0] for tier in self._tiers) or self._is_dirty(key)

    def promote_to_gpu(self, key: ChunkKey) -> bool:
        """Copy ``key`` into HBM now (a client leases it for device output); True if held.

        From DRAM when it is there; else straight from the disk tier's file into the
        GPU slab's pinned staging buffer (kvikio or POSIX), verified there; else
        through ``get`` (promoting into DRAM on the way).
        """
        self._check_open()
        gpu = self._gpu
        if gpu is None:
            return False
        if gpu.contains_many([key])[0]:
            return True
        deletes_before = self._num_deletes
        obj = self._cpu.peek(key)
        if obj is None and isinstance(self._backing, DiskTier):
            disk = self._backing
            size = disk.object_bytes(key)
            if size is not None and gpu.put_filled(key, size, lambda buf: disk.read_into(
                    key, buf, want_raw=True)):
                if self._num_deletes != deletes_before and not self._held_below_gpu(key):
                    gpu.delete(key)
                    return False
                return True
        if obj is None:
            obj = self.get(key)
        return obj is not None and self._place_in_gpu(key, obj, deletes_before)

    def _demote_gpu(self, key: ChunkKey, obj: bytes) -> None:
        """The GPU tier's on_evict: keep the chunk in DRAM unless a lower tier holds it."""
        if self._held_below_gpu(key):
            return
        deletes_before = self._num_deletes
        if not self._cpu.put(key, obj):
            self._write_backing(key, obj)  # DRAM full of leased bytes: straight to disk
        elif self._is_write_back:
            with self._dirty_changed:
                self._dirty[key] = time.monotonic()
                self._dirty_changed.notify_all()
        assert self._gpu is not None
        if self._num_deletes != deletes_before and not self._gpu.contains_many([key])[0]:
            # Deleted meanwhile (delete hides a victim mid-eviction): undo the copies.
            with self._key_lock(key):
                with self._dirty_lock:
                    self._dirty.pop(key, None)
                self._cpu.delete(key)
                if self._backing is not None:
                    self._backing.delete(key)

    # -- bookkeeping --------------------------------------------------------------

    def _key_lock(self, key: ChunkKey) -> threading.Lock:
        return self._key_locks[int.from_bytes(key[:4], "little") % _NUM_KEY_STRIPES]

    def _is_dirty(self, key: ChunkKey) -> bool:
        with self._dirty_lock:
            return key in self._dirty

    def _check_open(self) -> None:
        if self._closed:
            raise Unavailable("the storage engine is closed (daemon shutting down)")

    def stats(self) -> list[TierStats]:
        """Per-tier stats, fastest first.

        DRAM's ``info`` adds ``dirty`` (unflushed chunks), ``dirty_age_ms`` (how long
        the oldest has waited) and ``put_waits`` (puts that waited for the flusher).
        """
        all_stats = [tier.stats() for tier in self._all_tiers()]
        dram = all_stats[0 if self._gpu is None else 1]
        with self._dirty_lock:
            oldest = next(iter(self._dirty.values()), None)
            dram.info["dirty"] = str(len(self._dirty))
            dram.info["put_waits"] = str(self._num_put_waits)
        age_ms = 0 if oldest is None else round((time.monotonic() - oldest) * 1000)
        dram.info["dirty_age_ms"] = str(age_ms)
        return all_stats

    def close(self) -> None:
        """Flush dirty chunks, stop the flusher and close every tier. Idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._stop.set()
        with self._dirty_changed:
            self._dirty_changed.notify_all()  # wakes the flusher and any waiting put
        for flusher in self._flushers:
            flusher.join()
        self.flush()
        for tier in self._all_tiers():
            tier.close()
