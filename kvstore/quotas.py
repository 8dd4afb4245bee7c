"""Per-tenant byte quotas: how many bytes each tenant stores, and what a put over it does.

The ledger counts each object once (whatever tiers hold it), under the tenant that put
it; keys embed the tenant (``Namespace.id``), so an object belongs to exactly one
tenant. A put over its tenant's quota is refused (``tenants.over_quota = "refuse"``,
CapacityExhausted -> RESOURCE_EXHAUSTED) or makes room by deleting that tenant's own
oldest objects (``"evict"``); another tenant's objects are never touched.

Objects that tiers drop on their own (disk or Redis LRU) stay in the ledger until the
tenant next goes over quota: the engine then prunes keys no tier holds before deciding.
The ledger lives in memory: after a restart, objects stored before it are not counted
(a tenant may then store up to its quota again on top of them).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kvstore.config import TenantsConfig
from kvstore.errors import CapacityExhausted
from kvstore.keys import ChunkKey


@dataclass(frozen=True, slots=True)
class TenantUsage:
    """One tenant's figures."""

    used_bytes: int  # bytes of the objects it stores (counted since the daemon started)
    quota_bytes: int | None  # its quota; None = unlimited
    num_refused: int  # puts refused over quota
    num_evicted: int  # own objects deleted to make room (over_quota = "evict")


class TenantQuotas:
    """The ledger of who stores what. Thread-safe."""

    def __init__(self, config: TenantsConfig) -> None:
        self._quota = dict(config.quota_bytes)
        self._evict = config.over_quota == "evict"
        self._owner: dict[ChunkKey, tuple[str, int]] = {}  # key -> (tenant, bytes)
        self._objects: dict[str, OrderedDict[ChunkKey, int]] = {}  # oldest first
        self._used: dict[str, int] = {}
        self._refused: dict[str, int] = {}
        self._evicted: dict[str, int] = {}
        self._lock = threading.Lock()

    def admit(self, tenant: str, key: ChunkKey, size: int, *,
              stored: Callable[[Sequence[ChunkKey]], list[bool]],
              delete: Callable[[ChunkKey], object]) -> None:
        """Reserve ``size`` bytes for ``key`` under ``tenant``, making room if allowed.

        Args:
            stored: which of some keys any tier still holds (to prune stale entries).
            delete: removes one of this tenant's keys from every tier (evict policy).

        Raises:
            CapacityExhausted: over quota and the policy refuses (or the object alone
                is larger than the quota).
        """
        quota = self._quota.get(tenant)
        if quota is not None and self._over(tenant, size, quota):
            self._prune(tenant, stored)
            if self._over(tenant, size, quota):
                self._make_room(tenant, size, quota, delete)
        with self._lock:
            self._add(tenant, key, size)

    def _over(self, tenant: str, size: int, quota: int) -> bool:
        with self._lock:
            return self._used.get(tenant, 0) + size > quota

    def _prune(self, tenant: str, stored: Callable[[Sequence[ChunkKey]], list[bool]]) -> None:
        with self._lock:
            keys = list(self._objects.get(tenant, ()))
        gone = [k for k, is_stored in zip(keys, stored(keys), strict=True) if not is_stored]
        with self._lock:
            for key in gone:
                self._remove(key)

    def _make_room(self, tenant: str, size: int, quota: int,
                   delete: Callable[[ChunkKey], object]) -> None:
        with self._lock:
            used = self._used.get(tenant, 0)
            if size > quota or not self._evict:
                self._refused[tenant] = self._refused.get(tenant, 0) + 1
                raise CapacityExhausted(
                    f"tenant {tenant!r} stores {used} bytes of its {quota}-byte quota; a "
                    f"{size}-byte object does not fit (tenants.over_quota = "
                    f"{'evict' if self._evict else 'refuse'}); delete some of its chunks "
                    "or raise tenants.quota_bytes")
            victims: list[ChunkKey] = []
            for key, n in self._objects[tenant].items():  # oldest first
                if used + size <= quota:
                    break
                victims.append(key)
                used -= n
            for key in victims:
                self._remove(key)
            self._evicted[tenant] = self._evicted.get(tenant, 0) + len(victims)
        for key in victims:  # outside the lock: tier I/O
            delete(key)

    def _add(self, tenant: str, key: ChunkKey, size: int) -> None:
        if key in self._owner:
            return
        self._owner[key] = (tenant, size)
        self._objects.setdefault(tenant, OrderedDict())[key] = size
        self._used[tenant] = self._used.get(tenant, 0) + size

    def _remove(self, key: ChunkKey) -> None:
        entry = self._owner.pop(key, None)
        if entry is None:
            return
        tenant, size = entry
        del self._objects[tenant][key]
        self._used[tenant] -= size

    def forget(self, key: ChunkKey) -> None:
        """``key`` was deleted or its put failed: its bytes no longer count."""
        with self._lock:
            self._remove(key)

    def usage(self) -> dict[str, TenantUsage]:
        """Figures of every tenant that has a quota or has stored something."""
        with self._lock:
            tenants = set(self._quota) | set(self._used)
            return {t: TenantUsage(self._used.get(t, 0), self._quota.get(t),
                                   self._refused.get(t, 0), self._evicted.get(t, 0))
                    for t in tenants}
