"""The placement engine: write policy, promotion, demotion and lookup over the tiers.

Tiers are ordered fastest first. ``tiers[0]`` is the DRAM tier (a `CpuTier`), the
one every put and every promotion lands in. ``tiers[1]``, when present, is the
*backing* tier (the disk): under ``write-back`` a put only marks the chunk dirty and
a flusher thread writes dirty chunks to the backing tier every
``flush_interval_s``; under ``write-through`` the put writes it synchronously.
Whatever the policy, a chunk evicted from DRAM that the backing tier lacks is
written there on eviction (DRAM's ``on_evict`` is wired to `Engine._demote`), so a
chunk is lost only when the backing tier cannot hold it.

Tiers named in ``write_through_tiers`` (the shared Redis tier) receive every put
synchronously, whatever the policy; a slower tier is added by appending it to the
tier list and, if it should receive puts, naming it there.

Locking: each tier is thread-safe on its own. Operations that must not interleave
with a delete of the same key (demotion, flushing, undoing a racing promotion) hold
a per-key striped lock. No key lock is ever held while calling ``CpuTier.put``,
because that call may run ``_demote`` for another key in the same thread; hence no
thread ever holds two key locks and the stripes cannot deadlock.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection, Sequence

from kvstore.arena_file import Placement
from kvstore.config import Config, EngineConfig
from kvstore.errors import CapacityExhausted, InvalidArgument, Unavailable
from kvstore.keys import ChunkKey
from kvstore.quotas import TenantQuotas, TenantUsage
from kvstore.tiers.base import Tier, TierStats
from kvstore.tiers.cpu import CpuTier
from kvstore.tiers.disk import DiskTier
from kvstore.tiers.redis import RedisTier

logger = logging.getLogger(__name__)

_NUM_KEY_STRIPES = 64  # striped key locks: plenty for a thread pool of tens


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
    ) -> None:
        """Args:
        config: write policy and flush interval.
        quotas: per-tenant byte quotas; None = no tenant is limited.
        tiers: fastest first; ``tiers[0]`` must be a `CpuTier` whose ``on_evict`` is
            unset: the engine takes it over to demote evicted chunks.
        write_through_tiers: names of tiers below DRAM that get every put synchronously.

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
        # Dirty = in DRAM, not yet written to the backing tier (write-back only).
        # A dict keeps insertion order, so chunks are flushed oldest first.
        self._dirty: dict[ChunkKey, None] = {}
        self._dirty_lock = threading.Lock()
        self._key_locks = [threading.Lock() for _ in range(_NUM_KEY_STRIPES)]
        self._num_deletes = 0  # bumped by delete(); lets promotions detect a racing delete
        self._closed = False
        self._close_lock = threading.Lock()
        self._stop = threading.Event()
        self._cpu.on_evict = self._demote
        self._flusher: threading.Thread | None = None
        if self._is_write_back:
            self._flusher = threading.Thread(
                target=self._flush_loop, name="kvstore-flusher", daemon=True
            )
            self._flusher.start()

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
            tiers.append(RedisTier(config.tiers.redis))
            if config.tiers.redis.write_through:
                write_through.add("redis")
        quotas = TenantQuotas(config.tenants)
        return cls(config.engine, tiers, write_through_tiers=write_through, quotas=quotas)

    @property
    def dram(self) -> CpuTier:
        """The DRAM tier (its arena serves same-host clients' leases)."""
        return self._cpu

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
    def _is_write_back(self) -> bool:
        backing = self._backing
        return backing is not None and backing.name not in self._sync_names

    # -- reads --------------------------------------------------------------------

    def lookup(self, keys: Sequence[ChunkKey]) -> tuple[int, dict[str, int]]:
        """How many leading ``keys`` are stored: in any tier, and per tier by name."""
        self._check_open()
        present = [tier.contains_many(keys) for tier in self._tiers]
        names = [tier.name for tier in self._tiers]
        per_tier = {name: _num_leading(p) for name, p in zip(names, present, strict=True)}
        in_any = [any(column) for column in zip(*present, strict=True)]
        return _num_leading(in_any), per_tier

    def contains(self, key: ChunkKey) -> bool:
        self._check_open()
        return any(tier.contains_many([key])[0] for tier in self._tiers)

    def get(self, key: ChunkKey) -> bytes | None:
        """The object under ``key`` from the fastest tier holding it, or None.

        A hit below DRAM is promoted into DRAM (and a hit below the disk into the disk).
        """
        self._check_open()
        obj = self._cpu.get(key)
        if obj is not None:
            return obj
        return self._get_below_dram(key)

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

        Args:
            tenant: whose object it is (its bytes count against that tenant's quota).
            placed: ``obj`` is a view of reserved DRAM arena space a same-host client
                wrote (``server/local.py``); DRAM indexes it in place, and the tiers
                below get the same view (pinned until the commit ends): no byte is copied.

        Returns:
            True if newly stored; False if some tier already held the key (objects
            are content-addressed, so it is not rewritten).

        Raises:
            CapacityExhausted: every tier refused the object, or the tenant is over
                its quota and ``tenants.over_quota`` refuses.
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
        in_dram = self._cpu.put(key, obj, placed=placed)
        num_stored = int(in_dram)
        for tier in self._tiers[1:]:
            # Too big for DRAM: the backing tier takes it now, whatever the policy.
            if tier.name in self._sync_names or (tier is self._backing and not in_dram):
                num_stored += tier.put(key, obj)
        if num_stored == 0:
            capacities = ", ".join(f"{s.name}={s.capacity_bytes}" for s in self.stats())
            raise CapacityExhausted(
                f"no tier accepted chunk {key.hex()[:16]}… of {len(obj)} bytes (capacity_bytes: "
                f"{capacities}); a tier was too small or failed to write — raise its "
                f"capacity_bytes, store smaller chunks, or check the daemon log"
            )
        if in_dram and self._is_write_back:
            with self._dirty_lock:
                self._dirty[key] = None
        return True

    def delete(self, key: ChunkKey) -> bool:
        """Remove ``key`` from every tier; True if any tier held it."""
        self._check_open()
        with self._key_lock(key):
            with self._dirty_lock:  # also guards the counter: deletes of other keys race here
                self._num_deletes += 1
                self._dirty.pop(key, None)
            found = [tier.delete(key) for tier in self._tiers]
        if self._quotas is not None:
            self._quotas.forget(key)
        return any(found)

    def flush(self) -> None:
        """Write every dirty DRAM chunk to the backing tier now."""
        with self._dirty_lock:
            pending = list(self._dirty)
        for key in pending:
            # The backing tier writes straight from the arena: no copy of the object.
            with self._key_lock(key), self._cpu.pinned(key) as obj:
                if obj is not None:
                    self._write_backing(key, obj)
                with self._dirty_lock:
                    self._dirty.pop(key, None)

    def _demote(self, key: ChunkKey, obj: bytes) -> None:
        """DRAM's on_evict: keep the chunk in the backing tier unless it is there already."""
        with self._key_lock(key):
            # CpuTier keeps an object visible until this returns; absent means a
            # delete ran meanwhile, and writing it now would resurrect it.
            if self._cpu.contains_many([key])[0]:
                self._write_backing(key, obj)
            with self._dirty_lock:
                self._dirty.pop(key, None)

    def _write_backing(self, key: ChunkKey, obj: bytes) -> None:
        backing = self._backing
        if backing is None or backing.contains_many([key])[0]:
            return
        if not backing.put(key, obj):
            # The tier logged why (too big, I/O error); DRAM's copy is now the only one.
            logger.debug("%s tier refused chunk %s", backing.name, key.hex())

    def _flush_loop(self) -> None:
        while not self._stop.wait(self._config.flush_interval_s):
            try:
                self.flush()
            except Exception:
                # Keep flushing later rounds; a tier bug must not end write-back silently.
                logger.exception("write-back flush failed")

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
        """Per-tier stats, fastest first; DRAM's ``info["dirty"]`` counts unflushed chunks."""
        all_stats = [tier.stats() for tier in self._tiers]
        with self._dirty_lock:
            all_stats[0].info["dirty"] = str(len(self._dirty))
        return all_stats

    def close(self) -> None:
        """Flush dirty chunks, stop the flusher and close every tier. Idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._stop.set()
        if self._flusher is not None:
            self._flusher.join()
        self.flush()
        for tier in self._tiers:
            tier.close()
