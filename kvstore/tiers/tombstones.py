"""Redis deletes not yet confirmed by the node that owns the key: a read filter, retried.

A delete acknowledged while a Redis master is down must stay deleted after its
replica takes over, and the replica still holds the key. The Redis tier records a
tombstone for every delete it could not confirm; reads and ``contains`` treat a
tombstoned key as a miss, and the tier retries the delete until a master confirms
it, then drops the tombstone. A put that Redis takes also drops it (the key then
holds the new value). Retries and puts of tombstoned keys hold ``retry_lock``, so a
retry cannot remove a value put after the delete it retries; a delete that runs
while either is in flight gives its key a new generation, which they leave alone.

With a file, tombstones survive a daemon restart: the file is an append-only log,
one line per change, fsync'd before the call that changed it returns:

    kvstore-redis-tombstones 1\\n     header: magic and format version
    +<64 hex digits>\\n               a tombstone for that chunk key was recorded
    -<64 hex digits>\\n               it was dropped (the delete was confirmed)

A torn last line (a crash mid-append) or any line of another shape is skipped with
a warning. On open, and whenever the log holds many more lines than tombstones,
the file is rewritten (temp file, fsync, rename) with only the live ones.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from kvstore.errors import Unavailable
from kvstore.keys import ChunkKey

log = logging.getLogger(__name__)

TOMBSTONE_FILE_NAME = "redis-tombstones.log"  # its default name, in tiers.disk.path
_HEADER = b"kvstore-redis-tombstones 1\n"
_LINE = re.compile(rb"^([+-])([0-9a-f]{64})$")
_LINE_BYTES = 66  # sign, 64 hex digits, newline
_COMPACT_MIN_LINES = 4096  # rewrite once the log has this many lines and 4x the live ones
MAX_TOMBSTONES = 1 << 18  # beyond this many unconfirmed deletes, deletes fail (Unavailable)
RETRY_BATCH = 512  # tombstoned keys per retried (pipelined) delete
ConfirmDeletes = Callable[[list["ChunkKey"]], list[bool]]  # delete again; which Redis confirmed


class Tombstones:
    """A set of chunk keys whose Redis delete is pending, retried in a thread; thread-safe.

    Args:
        path: the log file, created if absent; None keeps tombstones in memory only
            (they do not survive a restart).
        confirm: deletes keys again in Redis; says which ones Redis confirmed.
        retry_s: seconds between retries while tombstones are pending.

    Raises:
        Unavailable: the file cannot be read or written.
    """

    def __init__(self, path: str | None, confirm: ConfirmDeletes, retry_s: float) -> None:
        self._path = None if path is None else Path(path)
        self._confirm = confirm
        self._retry_s = retry_s
        self.retry_lock = threading.Lock()  # held by a retry and by puts of tombstoned keys
        self._stop = threading.Event()
        self._retrier: threading.Thread | None = None
        # key -> generation, bumped by every add: a put or a retried delete that saw
        # generation g drops the tombstone only if no delete came since (insertion order:
        # retried oldest first).
        self._keys: dict[ChunkKey, int] = {}
        self._next_generation = 0
        self._lock = threading.Lock()
        self._num_lines = 0  # lines in the log file
        self._fd: int | None = None
        if self._path is not None:
            for key in self._read(self._path):
                self._keys[key] = self._bump()
            self._rewrite_locked()
        if self._keys:
            self._start_retrier()

    @property
    def path(self) -> Path | None:
        return self._path

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def _bump(self) -> int:
        self._next_generation += 1
        return self._next_generation

    def oldest(self, n: int) -> list[tuple[ChunkKey, int]]:
        """Up to ``n`` (key, generation) pairs, oldest first."""
        with self._lock:
            return list(itertools.islice(self._keys.items(), n))

    def generations(self, keys: Sequence[ChunkKey]) -> list[int | None]:
        """Each key's tombstone generation, None where it has none."""
        with self._lock:
            return [self._keys.get(k) for k in keys]

    def add_many(self, keys: Sequence[ChunkKey]) -> None:
        """Record tombstones (a new generation for keys that have one); durable
        (fsync'd) when this returns.

        Raises:
            Unavailable: the log could not be written, or ``MAX_TOMBSTONES`` are
                pending already; the caller must not acknowledge the delete.
        """
        with self._lock:
            new = [k for k in dict.fromkeys(keys) if k not in self._keys]
            if len(self._keys) + len(new) > MAX_TOMBSTONES:
                raise Unavailable(
                    f"{len(self._keys)} deletes are waiting for Redis to confirm them (at most "
                    f"{MAX_TOMBSTONES}); Redis has been unreachable too long to accept more "
                    "deletes: bring the Redis tier back, or retry the delete later")
            if new:
                self._append_locked(b"+", new)
            for key in keys:
                self._keys[key] = self._bump()
        self._start_retrier()

    def discard_many(self, seen: Iterable[tuple[ChunkKey, int | None]]) -> None:
        """Drop the tombstones of keys whose delete was confirmed (or whose key was put
        again) after their generation was read; a newer generation stays.

        A failure to log this is only logged: a tombstone that comes back after a
        restart costs one more delete of that key in Redis (at worst of the Redis copy
        of a chunk put again since: a miss there, never a deleted chunk served).
        """
        with self._lock:
            gone = list(dict.fromkeys(k for k, g in seen
                                      if g is not None and self._keys.get(k) == g))
            for key in gone:
                del self._keys[key]
            if not gone or self._path is None:
                return
            try:
                if self._num_lines >= max(_COMPACT_MIN_LINES, 4 * len(self._keys)):
                    self._rewrite_locked()
                else:
                    self._append_locked(b"-", gone)
            except Unavailable as exc:
                log.warning("redis tier: %s", exc)

    def retry(self) -> int:
        """Delete up to ``RETRY_BATCH`` tombstoned keys again now, oldest first; drops
        the tombstones Redis confirmed and returns how many."""
        with self.retry_lock:
            pending = self.oldest(RETRY_BATCH)
            if not pending:
                return 0
            confirmed = self._confirm([k for k, _ in pending])
            done = [item for item, ok in zip(pending, confirmed, strict=True) if ok]
            self.discard_many(done)
        if done:
            log.info("redis tier: %d delete(s) confirmed on retry, %d still pending",
                     len(done), len(self))
        return len(done)

    def _start_retrier(self) -> None:
        with self._lock:
            if self._retrier is None and not self._stop.is_set():
                self._retrier = threading.Thread(target=self._retry_loop, daemon=True,
                                                 name="kvstore-redis-tombstones")
                self._retrier.start()

    def _retry_loop(self) -> None:
        while not self._stop.wait(self._retry_s):
            try:
                while self._keys and self.retry() == RETRY_BATCH:
                    pass
            except Exception:  # keep retrying; a bug here must not end it silently
                log.exception("redis tier: retrying unconfirmed deletes failed")

    def close(self) -> None:
        """Stop retrying and close the log; pending tombstones stay in it."""
        with self._lock:
            self._stop.set()
            retrier = self._retrier
        if retrier is not None:
            retrier.join()
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    # -- the log file -----------------------------------------------------------------

    @staticmethod
    def _read(path: Path) -> list[ChunkKey]:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise Unavailable(f"cannot read the Redis tombstone log {path}: {exc}") from exc
        if not data.startswith(_HEADER):
            raise Unavailable(f"{path} is not a kvstore Redis tombstone log (its first line is "
                              f"{data[:40]!r}, expected {_HEADER!r}); move it away or set "
                              "tiers.redis.tombstone_file to another path")
        live: dict[ChunkKey, None] = {}
        num_bad = 0
        for line in data[len(_HEADER):].split(b"\n"):
            m = _LINE.match(line)
            if m is None:
                num_bad += bool(line)
                continue
            key = ChunkKey(bytes.fromhex(m.group(2).decode()))
            if m.group(1) == b"+":
                live[key] = None
            else:
                live.pop(key, None)
        if num_bad:
            log.warning("redis tier: skipped %d malformed line(s) of the tombstone log %s "
                        "(a torn last line after a crash is expected)", num_bad, path)
        if live:
            log.warning("redis tier: %d delete(s) not yet confirmed by Redis before the last "
                        "stop; they stay misses and are retried", len(live))
        return list(live)

    def _append_locked(self, sign: bytes, keys: list[ChunkKey]) -> None:
        if self._fd is None:
            return
        data = b"".join(sign + k.hex().encode() + b"\n" for k in keys)
        assert len(data) == _LINE_BYTES * len(keys)
        try:
            view = memoryview(data)
            while view:  # O_APPEND; a crash mid-write only tears the last line
                view = view[os.write(self._fd, view):]
            os.fsync(self._fd)
        except OSError as exc:
            raise Unavailable(f"cannot write the Redis tombstone log {self._path}: {exc}") from exc
        self._num_lines += len(keys)

    def _rewrite_locked(self) -> None:
        """Replace the log by one holding only the live tombstones (temp, fsync, rename)."""
        assert self._path is not None
        tmp = self._path.with_name(self._path.name + ".tmp")
        data = _HEADER + b"".join(b"+" + k.hex().encode() + b"\n" for k in self._keys)
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self._path)
            dir_fd = os.open(self._path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
            if self._fd is not None:
                os.close(self._fd)
            self._fd = os.open(self._path, os.O_WRONLY | os.O_APPEND)
        except OSError as exc:
            raise Unavailable(f"cannot write the Redis tombstone log {self._path}: {exc}") from exc
        self._num_lines = len(self._keys)
