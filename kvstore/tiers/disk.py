"""The local-disk tier: one crash-safe object file per chunk, an in-memory LRU index.

Files live at ``<path>/<first 2 hex of key>/<64 hex of key>.kvc`` and hold the KVC1
object verbatim followed by its 64-byte key record (``tiers/record.py``): a file
copied over another chunk's, or one written before records existed, reads as a
corrupt miss. Files are 0600 in 0700 directories: KV tensors are user data, and no
other local user may read them. Writes go to ``<name>.kvc.tmp-<random>`` in the same directory,
are fsynced, renamed over the final name and the directory is fsynced (both fsyncs
when ``config.fsync``), so a crash leaves either the whole object or none of it
plus a temp file that the next start-up deletes. A write that finds the file system
full (ENOSPC, EDQUOT) evicts least recently used objects and retries, so a disk
shared with other files degrades to a smaller cache instead of refusing every put.

The index (key -> file size, least recently used first) is rebuilt at start-up
from the files, ordered by mtime, without reading them: every read verifies the
object instead. Renames and unlinks happen under the index lock so that the index
and the directory agree; the expensive parts (writing, fsync, reading) do not.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import secrets
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

from kvstore.codec.format import CodecId, verify_object
from kvstore.config import DiskTierConfig
from kvstore.errors import Corrupt, InvalidArgument
from kvstore.keys import ChunkKey
from kvstore.tiers.base import TierStats
from kvstore.tiers.burst_log import BurstLog
from kvstore.tiers.disk_io import select_io
from kvstore.tiers.record import RECORD_BYTES, check_record, pack_record

logger = logging.getLogger(__name__)

_SUFFIX = ".kvc"
_TMP_MARK = ".tmp-"
_KEY_HEX_CHARS = 64  # a ChunkKey is a 32-byte SHA-256 digest
_FILE_MODE = 0o600  # object files: the daemon's user only
_DIR_MODE = 0o700
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def _parse_key(name: str) -> ChunkKey | None:
    """The key named by an object file name, or None for anything else."""
    stem = name[: -len(_SUFFIX)] if name.endswith(_SUFFIX) else ""
    if len(stem) != _KEY_HEX_CHARS:
        return None
    try:
        return ChunkKey(bytes.fromhex(stem))
    except ValueError:
        return None


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view.nbytes:
        written = os.write(fd, view)
        view = view[written:]


class _WriteFailed(Exception):
    """A temp file could not be written; ``errno`` tells a full disk from other errors."""

    def __init__(self, what: str, exc: OSError) -> None:
        super().__init__(f"{what}: {exc}")
        self.errno = exc.errno


def _make_private(path: str, mode: int) -> None:
    try:
        os.chmod(path, mode)
    except OSError as exc:  # another user's file: reads still work, it stays as it is
        logger.warning("disk tier cannot make %s private: %s", path, exc)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DiskTier:
    """Disk tier, name ``"disk"``: object files under ``config.path``, LRU within capacity."""

    name = "disk"

    def __init__(self, config: DiskTierConfig) -> None:
        """Open (creating if needed) the directory and index the objects already in it.

        Raises:
            InvalidArgument: the directory cannot be created or listed.
        """
        self._root = str(Path(config.path).expanduser())
        self._capacity_bytes = config.capacity_bytes
        self._fsync = config.fsync
        self._io = select_io(config.io)  # kvikio or POSIX reads, chosen once
        self._lock = threading.Lock()
        self._index: OrderedDict[ChunkKey, int] = OrderedDict()  # key -> bytes, LRU first
        self._used_bytes = 0
        self._known_dirs: set[str] = set()  # subdirectories known to exist
        self._stats = TierStats(name=self.name, capacity_bytes=self._capacity_bytes)
        self._write_failures = BurstLog(logger)  # one line per burst of failed writes
        try:
            os.makedirs(self._root, mode=_DIR_MODE, exist_ok=True)
            self._rebuild_index()
        except OSError as exc:
            raise InvalidArgument(
                f"disk tier path {self._root} is not a usable directory: {exc}"
            ) from exc
        with self._lock:
            victims = self._evict_to_fit_locked()
        logger.info(
            "disk tier %s: %d objects, %d bytes indexed (%d evicted to fit %d bytes)",
            self._root, len(self._index), self._used_bytes, len(victims), self._capacity_bytes,
        )

    # -- paths and start-up -------------------------------------------------------

    def path_of(self, key: ChunkKey) -> str:
        """The object file that holds (or would hold) ``key``."""
        hex_key = key.hex()
        return os.path.join(self._root, hex_key[:2], hex_key + _SUFFIX)

    def _rebuild_index(self) -> None:
        found: list[tuple[int, ChunkKey, int]] = []  # (mtime_ns, key, size)
        num_temp = 0
        with os.scandir(self._root) as top:
            subdirs = [e.path for e in top if e.is_dir(follow_symlinks=False) and len(e.name) == 2]
        for subdir in subdirs:
            self._known_dirs.add(subdir)
            _make_private(subdir, _DIR_MODE)  # directories of older versions were 0755
            with os.scandir(subdir) as entries:
                for entry in entries:
                    if _TMP_MARK in entry.name:
                        self._unlink_quietly(entry.path)
                        num_temp += 1
                        continue
                    key = _parse_key(entry.name)
                    if key is None or entry.path != self.path_of(key):
                        logger.warning("disk tier ignores unexpected file %s", entry.path)
                        continue
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    if st.st_mode & 0o077:
                        _make_private(entry.path, _FILE_MODE)
                    found.append((st.st_mtime_ns, key, st.st_size))
        found.sort(key=lambda item: item[0])
        for _, key, size in found:
            self._index[key] = size
            self._used_bytes += size
        if num_temp:
            logger.info("disk tier %s: removed %d leftover temp files", self._root, num_temp)

    # -- the Tier protocol --------------------------------------------------------

    def get(self, key: ChunkKey) -> bytes | None:
        """The verified object under ``key``, or None (absent, corrupt or unreadable).

        Corrupt includes a file whose key record names another chunk (a file copied
        or moved over this one) or is missing (written before records existed).
        """
        with self._lock:
            if key not in self._index:
                self._stats.misses += 1
                return None
            self._index.move_to_end(key)
        path = self.path_of(key)
        try:
            data, record, inode = self._io.read(path, RECORD_BYTES)
        except FileNotFoundError:
            self._forget_missing(key, path)
            return None
        except OSError as exc:
            logger.warning("disk tier cannot read %s: %s", path, exc)
            with self._lock:
                self._stats.errors += 1
                self._stats.misses += 1
            return None
        try:
            check_record(record, key, data)
            verify_object(data)
        except Corrupt as exc:
            logger.warning("disk tier dropped corrupt object %s: %s", path, exc)
            self._drop_corrupt(key, path, inode)
            return None
        with self._lock:
            self._stats.hits += 1
            self._stats.read_bytes += len(data)
        return data

    def put(self, key: ChunkKey, obj: bytes) -> bool:
        """Write ``obj`` and its key record crash-safely; True if held afterwards.

        On a full file system, least recently used objects are evicted until the
        write fits. Returns False (counted in ``errors``, logged once per burst) when
        the write still fails, leaving no partial file; and False when ``obj`` is
        larger than the capacity.
        """
        record = pack_record(key, obj)
        size = len(obj) + len(record)
        if size > self._capacity_bytes:
            return False
        with self._lock:
            if key in self._index:  # content-addressed: the same key is the same bytes
                self._index.move_to_end(key)
                return True
        path = self.path_of(key)
        tmp = self._write_making_room(key, path, (obj, record))
        if tmp is None:
            return False
        with self._lock:
            try:
                os.replace(tmp, path)
            except OSError as exc:
                self._stats.errors += 1
                self._unlink_quietly(tmp)
                self._write_failures.warning("disk tier cannot rename %s to %s: %s", tmp, path,
                                             exc)
                return False
            if key not in self._index:
                self._used_bytes += size
                self._stats.puts += 1
                self._stats.written_bytes += size
            self._index[key] = size
            self._index.move_to_end(key)
            self._evict_to_fit_locked()
        if self._fsync:
            try:
                _fsync_dir(os.path.dirname(path))
            except OSError as exc:  # the object is in place; only its durability is in doubt
                self._write_failures.warning("disk tier cannot fsync directory of %s: %s",
                                             path, exc)
                self._count_error()
        return True

    def _write_making_room(self, key: ChunkKey, path: str,
                           parts: tuple[bytes, bytes]) -> str | None:
        """Write a temp file, evicting LRU objects while the file system is full."""
        size = sum(len(p) for p in parts)
        while True:
            try:
                return self._write_temp(path, parts)
            except _WriteFailed as exc:
                if exc.errno in _FULL_ERRNOS and self._could_fit(size) and \
                        self._evict_for_room(size, key):
                    continue
                self._count_error()
                self._write_failures.warning("disk tier cannot store %d bytes at %s: %s",
                                             size, path, exc)
                return None

    def contains_many(self, keys: Sequence[ChunkKey]) -> list[bool]:
        with self._lock:
            return [k in self._index for k in keys]

    def delete(self, key: ChunkKey) -> bool:
        """Remove ``key``'s file; True if it was indexed."""
        with self._lock:
            size = self._index.pop(key, None)
            if size is None:
                return False
            self._used_bytes -= size
            self._unlink_quietly(self.path_of(key))
            return True

    def stats(self) -> TierStats:
        with self._lock:
            return dataclasses.replace(
                self._stats,
                used_bytes=self._used_bytes,
                num_objects=len(self._index),
                info={"io": self._io.name, "path": self._root, "fsync": str(self._fsync).lower()},
            )

    def object_bytes(self, key: ChunkKey) -> int | None:
        """The size of ``key``'s object file, or None if the tier does not hold it."""
        with self._lock:
            size = self._index.get(key)  # the file: the object, then its key record
        return None if size is None else size - RECORD_BYTES

    def read_into(self, key: ChunkKey, out: memoryview, *, want_raw: bool = False) -> bool:
        """Read ``key``'s object into ``out`` (exactly ``object_bytes(key)`` long), verified.

        The GPU tier passes its pinned staging buffer, so the object reaches HBM with
        one DMA. False (counted like ``get``'s misses) if absent, unreadable, corrupt,
        of another size than ``out``, or not raw when ``want_raw``.
        """
        if self.object_bytes(key) != len(out):  # absent, or the caller's size is stale
            self._count_miss()
            return False
        path = self.path_of(key)
        try:
            num_read, inode = self._io.read_into(path, out)
        except FileNotFoundError:
            self._forget_missing(key, path)
            return False
        except OSError as exc:
            logger.warning("disk tier cannot read %s: %s", path, exc)
            self._count_error()
            return False
        if num_read != len(out):  # replaced or truncated meanwhile: ``get`` sorts it out
            self._count_miss()
            return False
        try:
            check_record(_read_tail(path, len(out)), key, out)
            header = verify_object(out)
        except Corrupt as exc:
            logger.warning("disk tier dropped corrupt object %s: %s", path, exc)
            self._drop_corrupt(key, path, inode)
            return False
        if want_raw and header.codec_id != CodecId.RAW:
            self._count_miss()
            return False
        with self._lock:
            self._stats.hits += 1
            self._stats.read_bytes += num_read
        return True

    def close(self) -> None:
        """Nothing to release: every put is already on disk (and fsynced if configured)."""

    # -- helpers ------------------------------------------------------------------

    def _write_temp(self, path: str, parts: tuple[bytes, bytes]) -> str:
        """Write ``parts`` to a fresh temp file beside ``path``; its name.

        Raises:
            _WriteFailed: the file could not be created or written (none is left behind).
        """
        tmp = f"{path}{_TMP_MARK}{secrets.token_hex(6)}"
        try:
            fd = self._create_file(tmp)
        except OSError as exc:
            raise _WriteFailed(f"cannot create {tmp}", exc) from exc
        try:
            try:
                for part in parts:
                    _write_all(fd, part)
                if self._fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:  # ENOSPC and EIO land here; leave no partial file behind
            self._unlink_quietly(tmp)
            raise _WriteFailed(f"cannot write {tmp}", exc) from exc
        return tmp

    def _create_file(self, path: str) -> int:
        subdir = os.path.dirname(path)
        self._ensure_dir(subdir)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        try:
            return os.open(path, flags, _FILE_MODE)
        except FileNotFoundError:  # the subdirectory was removed behind our back
            self._known_dirs.discard(subdir)
            self._ensure_dir(subdir)
            return os.open(path, flags, _FILE_MODE)

    def _ensure_dir(self, subdir: str) -> None:
        if subdir in self._known_dirs:
            return
        os.makedirs(subdir, mode=_DIR_MODE, exist_ok=True)
        if self._fsync:  # make the new directory entry itself durable
            _fsync_dir(self._root)
        self._known_dirs.add(subdir)

    def _evict_to_fit_locked(self) -> list[ChunkKey]:
        victims: list[ChunkKey] = []
        while self._used_bytes > self._capacity_bytes:
            victim, size = self._index.popitem(last=False)
            self._used_bytes -= size
            self._stats.evictions += 1
            self._unlink_quietly(self.path_of(victim))
            victims.append(victim)
        return victims

    def _could_fit(self, num_bytes: int) -> bool:
        """Whether evicting every object would leave room for ``num_bytes`` on the file
        system: an object that can never fit must not empty the tier first."""
        try:
            fs = os.statvfs(self._root)
        except OSError:
            return True
        with self._lock:
            used_bytes = self._used_bytes
        return num_bytes <= used_bytes + fs.f_bavail * fs.f_frsize

    def _evict_for_room(self, num_bytes: int, keep: ChunkKey) -> int:
        """Evict LRU objects (never ``keep``) worth at least ``num_bytes``; how many.

        Called when the file system is full: the capacity was not reached, but the
        disk holds other files too. 0 when nothing is left to evict.
        """
        freed = 0
        victims: list[ChunkKey] = []
        with self._lock:
            for victim in list(self._index):
                if freed >= num_bytes:
                    break
                if victim == keep:
                    continue
                size = self._index.pop(victim)
                self._used_bytes -= size
                self._stats.evictions += 1
                self._unlink_quietly(self.path_of(victim))
                victims.append(victim)
                freed += size
        if victims:
            logger.debug("disk tier full: evicted %d objects (%d bytes) to make room",
                         len(victims), freed)
        return len(victims)

    def _forget_missing(self, key: ChunkKey, path: str) -> None:
        """A read found the file gone (deleted meanwhile, or removed behind our back)."""
        with self._lock:
            self._stats.misses += 1
            if key in self._index and not os.path.exists(path):
                logger.warning("disk tier object %s vanished; dropping it from the index", path)
                self._used_bytes -= self._index.pop(key)

    def _drop_corrupt(self, key: ChunkKey, path: str, inode: int) -> None:
        with self._lock:
            self._stats.corrupt += 1
            self._stats.misses += 1
            try:
                same_file = os.stat(path).st_ino == inode
            except OSError:
                same_file = False  # already replaced or removed
            if same_file:
                self._unlink_quietly(path)
                size = self._index.pop(key, None)
                if size is not None:
                    self._used_bytes -= size

    def _unlink_quietly(self, path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            logger.warning("disk tier cannot remove %s: %s", path, exc)

    def _count_miss(self) -> None:
        with self._lock:
            self._stats.misses += 1

    def _count_error(self) -> None:
        with self._lock:
            self._stats.errors += 1


def _read_tail(path: str, offset: int) -> bytes:
    """The key record stored after an object of ``offset`` bytes (short if missing)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, RECORD_BYTES, offset)
    finally:
        os.close(fd)
