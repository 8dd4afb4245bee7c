"""The Tier protocol every storage tier implements, and the counters they report."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from kvstore.keys import ChunkKey

# Called with (key, object) when a tier evicts an object, so the engine can demote it.
EvictCallback = Callable[[ChunkKey, bytes], None]


@dataclass(slots=True)
class TierStats:
    """Occupancy and counters of one tier, as reported by `Stats`."""

    name: str  # "cpu", "disk", "redis", "gpu"
    used_bytes: int = 0  # bytes of objects held
    capacity_bytes: int = 0  # configured capacity
    num_objects: int = 0  # objects held
    hits: int = 0  # gets that returned an object
    misses: int = 0  # gets that found nothing (corrupt and errors included)
    evictions: int = 0  # objects dropped to stay within capacity
    corrupt: int = 0  # objects that failed verification and were dropped
    errors: int = 0  # backend errors turned into misses (I/O, Redis, timeouts)
    puts: int = 0  # objects written
    read_bytes: int = 0  # bytes returned by gets
    written_bytes: int = 0  # bytes accepted by puts
    info: dict[str, str] = field(default_factory=dict)  # tier-specific facts ("io": "posix")


@runtime_checkable
class Tier(Protocol):
    """A key -> KVC1 object store with a byte capacity. All methods are thread-safe.

    Misses are results: ``get`` returns None for absent, corrupt or unreachable
    objects and counts why. ``put`` returns False when the object cannot be held
    (larger than the capacity, backend down), never raising for that.
    """

    name: str

    def get(self, key: ChunkKey) -> bytes | None: ...

    def put(self, key: ChunkKey, obj: bytes) -> bool: ...

    def contains_many(self, keys: Sequence[ChunkKey]) -> list[bool]: ...

    def delete(self, key: ChunkKey) -> bool: ...

    def stats(self) -> TierStats: ...

    def close(self) -> None: ...
