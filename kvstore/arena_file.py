"""The arena file: its header format, creation, stale-file cleanup and read-only mapping.

Shared by the daemon (``kvstore.arena.Arena`` creates and writes the file) and
the client (``ArenaReader`` maps it read-only); needs only the standard library
and numpy (the address of a mapping, for the GIL-free prefault).

File layout (little-endian): the first ``HEADER_BYTES`` (one 4 KiB page) hold the
header, objects follow, each starting on an ``ALIGN``-byte boundary::

    offset size field
    0      4    magic        b"KVA1"
    4      2    version      FILE_VERSION (1)
    6      2    reserved     0
    8      8    data_bytes   bytes of the object region after the header page
    16     16   nonce        random per arena; a client proves it mapped *this*
                             daemon's arena by reading it back (same-host check)
    32     4    pid          the daemon's process id (stale files of dead daemons
                             are removed at start-up)

The file lives in a shared-memory directory (``/dev/shm`` by default, or a
hugetlbfs mount when hugepages are asked for and available) with mode 0600: only
processes of the daemon's user can open it.
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import logging
import mmap
import os
import secrets
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kvstore.errors import CapacityExhausted, Corrupt, InvalidArgument, NotFound

log = logging.getLogger(__name__)

# Objects start on a cache-line boundary: enough for vectorised copies, and CUDA
# registers the arena as a whole, never per object. Small objects waste little.
ALIGN = 64
HEADER_BYTES = 4096  # one page, so the object region starts page-aligned
PAGE_BYTES = 4096
_HUGE_PAGE = 2 << 20
FILE_HEADER = struct.Struct("<4sHHQ16sI")
FILE_MAGIC = b"KVA1"
FILE_VERSION = 1
_PREFIX = "kvstore-arena-"
assert FILE_HEADER.size <= HEADER_BYTES


@dataclass(frozen=True, slots=True)
class Extent:
    """Where one object lies in the arena file."""

    offset: int  # bytes from the start of the file
    length: int  # bytes of the object


@dataclass(frozen=True, slots=True)
class Placement:
    """An object already written into reserved arena space: extent ``index`` of a reservation."""

    reservation_id: int
    index: int


@dataclass(frozen=True, slots=True)
class ArenaIdentity:
    """What a client needs to map an arena and prove it is the daemon's."""

    path: str  # the arena file
    file_bytes: int  # size of the file (header page included)
    nonce: bytes  # 16 random bytes, also written in the file header
    hugepages: str  # "hugetlbfs", "thp" (madvise) or "off"


@dataclass(slots=True)
class FreeList:
    """First-fit allocator over [start, start + capacity) in ALIGN units, coalescing on free.

    Kept as a sorted list of (offset, length) holes; bisect makes insert and
    coalesce O(log n) to find plus a list insert, fine for thousands of holes.
    """

    capacity: int
    start: int = 0
    holes: list[tuple[int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.holes = [(self.start, self.capacity)]

    def allocate(self, size: int) -> int | None:
        for i, (offset, length) in enumerate(self.holes):
            if length >= size:
                if length == size:
                    del self.holes[i]
                else:
                    self.holes[i] = (offset + size, length - size)
                return offset
        return None

    def free(self, offset: int, size: int) -> None:
        i = bisect.bisect_left(self.holes, (offset, 0))
        if i > 0 and sum(self.holes[i - 1]) == offset:  # merge with the hole before
            i -= 1
            offset, size = self.holes[i][0], self.holes[i][1] + size
            del self.holes[i]
        if i < len(self.holes) and offset + size == self.holes[i][0]:  # and the one after
            size += self.holes[i][1]
            del self.holes[i]
        self.holes.insert(i, (offset, size))

    @property
    def free_bytes(self) -> int:
        return sum(length for _, length in self.holes)


def host_boot_id() -> str:
    """This host's boot id (changes on every boot, differs between hosts); "" if unknown."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def round_up(n: int, unit: int) -> int:
    return (n + unit - 1) // unit * unit


def _is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def remove_stale_files(directory: str) -> int:
    """Unlink arena files of daemons that died without closing them; returns how many."""
    removed = 0
    try:
        names = os.listdir(directory)
    except OSError:
        return 0
    for name in names:
        pid_text = name[len(_PREFIX):].split("-", 1)[0] if name.startswith(_PREFIX) else ""
        if pid_text.isdigit() and not _is_alive(int(pid_text)):
            try:
                os.unlink(os.path.join(directory, name))
                removed += 1
            except OSError:
                pass  # another user's file, or already gone
    if removed:
        log.info("removed %d stale arena files of dead daemons from %s", removed, directory)
    return removed


def create_file(directory: str, file_bytes: int, *, hugepages: bool
                 ) -> tuple[str, mmap.mmap, str]:
    """Create and map the arena file; tries hugetlbfs first when ``hugepages``."""
    if hugepages and os.path.isdir("/dev/hugepages"):
        try:
            return (*_map_new("/dev/hugepages", round_up(file_bytes, _HUGE_PAGE)), "hugetlbfs")
        except OSError as exc:  # no free huge pages, or no permission
            log.info("hugetlbfs arena not available (%s); using %s", exc, directory)
    base = directory if os.path.isdir(directory) else "/tmp"
    path, mapped = _map_new(base, file_bytes)
    mode = "off"
    if hugepages and hasattr(mmap, "MADV_HUGEPAGE"):
        try:  # transparent huge pages for shmem, when the kernel allows it
            mapped.madvise(mmap.MADV_HUGEPAGE)
            mode = "thp"
        except OSError:
            pass
    return path, mapped, mode


def _map_new(directory: str, file_bytes: int) -> tuple[str, mmap.mmap]:
    path = str(Path(directory) / f"{_PREFIX}{os.getpid()}-{secrets.token_hex(6)}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, file_bytes)
        # Reserve the pages now: a sparse tmpfs file that later finds /dev/shm full
        # would kill the daemon with SIGBUS on a write; this fails at start instead.
        try:
            os.posix_fallocate(fd, 0, file_bytes)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise CapacityExhausted(
                    f"cannot reserve {file_bytes} bytes for the DRAM arena in {directory}: "
                    f"{exc.strerror}; lower tiers.cpu.capacity_bytes or point "
                    "tiers.cpu.shm_dir at a larger tmpfs"
                ) from exc
        return path, mmap.mmap(fd, file_bytes)
    except (OSError, CapacityExhausted):
        os.unlink(path)
        raise
    finally:
        os.close(fd)


_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux >= 5.14
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)
# ~2 ms of kernel time per call here. Called through ctypes, which drops the GIL
# for the call: ``mmap.madvise`` holds it, and a background prefault of a whole
# arena then took the GIL from the inference process ~2 ms at a time.
_PREFAULT_SLICE = 4 << 20


def _libc_madvise() -> Any:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):  # no libc madvise here: report EINVAL's failure
        return lambda *args: -1
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


_madvise = _libc_madvise()


def populate(mapped: mmap.mmap, offset: int, length: int, *, writable: bool) -> bool:
    """Fault ``mapped[offset:offset + length]`` into this process's page tables, with the
    GIL released; False where the kernel cannot (older than 5.14) or the map is closed.

    The buffer held during the call keeps ``mapped`` from being unmapped under it.
    """
    try:
        with memoryview(mapped) as whole:
            part = np.frombuffer(whole, np.uint8, length, offset)
            advice = _MADV_POPULATE_WRITE if writable else _MADV_POPULATE_READ
            failed = _madvise(part.ctypes.data, length, advice) != 0
            del part
    except ValueError:  # the mapping was closed meanwhile
        return False
    if failed:  # EINVAL: kernel older than 5.14; pages fault on first use
        log.debug("arena prefault stopped: %s", os.strerror(ctypes.get_errno()))
    return not failed


def prefault(mapped: mmap.mmap, *, slice_bytes: int = _PREFAULT_SLICE,
             writable: bool = True, stop: threading.Event | None = None) -> None:
    """Fault every page of ``mapped`` into this process's page tables (contents unchanged).

    fallocate reserved the pages, but each one still costs a fault on its first
    write through this mapping: measured here, the first pass of 5.9 MB copies over
    a fresh shm mapping ran at 1.9-2.2 GB/s, later passes (and passes after this) at
    12-16 GB/s (``python bench/bench_micro.py``, row "arena_first_write"). The
    daemon runs it in a background thread over its whole arena; the GIL is
    released during each slice, so its other threads run meanwhile. Returns early,
    quietly, on a kernel without MADV_POPULATE_*, once ``stop`` is set or once the
    mapping is closed; an owner that sets ``stop`` and joins this thread before
    closing never has a madvise reach a freed range.
    """
    size = len(mapped)
    for offset in range(0, size, slice_bytes):
        if (stop is not None and stop.is_set()) or \
                not populate(mapped, offset, min(slice_bytes, size - offset), writable=writable):
            return


class ArenaReader:
    """A client's mapping of a daemon's arena file (read-only unless ``writable``).

    Args:
        path: the arena file the daemon named.
        nonce: when given, the file header must carry it, which proves the file is
            the daemon's arena (the client is on the daemon's host).
        writable: map it read-write, for a same-host put writing into space the
            daemon reserved for it (reads keep a read-only mapping).

    Raises:
        NotFound: the file cannot be opened or mapped (another host, user or daemon).
        Corrupt: the file is not an arena or its nonce differs.
    """

    def __init__(self, path: str, *, nonce: bytes | None = None, writable: bool = False) -> None:
        try:
            fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
        except OSError as exc:
            raise NotFound(f"cannot open arena {path}: {exc}") from exc
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        try:
            self._map = self._map_checked(fd, path, prot)
        except BaseException:
            os.close(fd)
            raise
        # Kept open: reads compare the file's size with what they touch (see view).
        self._fd = fd
        self.path = path
        self._view = memoryview(self._map)
        magic, version, _, data_bytes, found, _ = FILE_HEADER.unpack_from(self._view)
        if magic != FILE_MAGIC or version != FILE_VERSION or (nonce is not None and
                                                              found != nonce):
            self.close()
            raise Corrupt(f"{path} is not the daemon's arena (magic {magic!r}, version "
                          f"{version}, nonce {'matches' if found == nonce else 'differs'})")
        if self._view.nbytes < HEADER_BYTES + data_bytes:
            self.close()
            raise Corrupt(f"arena {path} is {self._view.nbytes} bytes, its header says "
                          f"{HEADER_BYTES + data_bytes} (truncated)")
        self.nonce = found
        # Slices of the mapping already faulted in (see ``_populate``): a view faults
        # in the slices it reaches first, and a background thread at the lowest CPU
        # priority does the rest. Prefaulting a multi-GB arena at normal priority
        # (and, through mmap.madvise, with the GIL held) took a core and the GIL
        # from the inference process for seconds.
        self._writable = writable
        self._populated = bytearray(-(-self._view.nbytes // _PREFAULT_SLICE))
        self._can_populate = True
        self._stop_prefault = threading.Event()
        self._prefaulter = threading.Thread(target=self._prefault_idle,
                                            name="kvstore-arena-client-prefault", daemon=True)
        self._prefaulter.start()

    def _prefault_idle(self) -> None:
        """Fault in every slice not touched yet, on a thread at nice 19 (idle CPU only)."""
        try:  # Linux: the priority of this thread alone
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except (OSError, AttributeError):
            pass
        for index in range(len(self._populated)):
            if self._stop_prefault.is_set() or not self._can_populate:
                return
            self._populate_slice(index)

    @staticmethod
    def _map_checked(fd: int, path: str, prot: int) -> mmap.mmap:
        """Map the whole file once it is known to hold at least the header page."""
        size = os.fstat(fd).st_size
        if size < HEADER_BYTES:  # reading a header past the end would raise SIGBUS
            raise Corrupt(f"arena {path} is {size} bytes, shorter than its "
                          f"{HEADER_BYTES}-byte header page (truncated, or not an arena)")
        try:
            return mmap.mmap(fd, size, prot=prot)
        except (OSError, ValueError) as exc:
            raise NotFound(f"cannot map arena {path}: {exc}") from exc

    @property
    def nbytes(self) -> int:
        return self._view.nbytes

    def view(self, extent: Extent) -> memoryview:
        """Zero-copy view of one leased object; valid until the lease ends.

        Raises:
            InvalidArgument: the extent lies outside the mapping.
            Corrupt: the file was truncated below the extent since it was mapped.
                Touching those pages would kill this process with SIGBUS, so the
                file's size is checked first (a truncation racing the copy itself
                cannot be caught; only processes of the daemon's user can do it).
        """
        end = extent.offset + extent.length
        if extent.offset < 0 or end > self._view.nbytes:
            raise InvalidArgument(f"extent {extent} outside the arena of {self._view.nbytes} bytes")
        size = os.fstat(self._fd).st_size
        if end > size:
            raise Corrupt(f"arena {self.path} was truncated to {size} bytes; extent {extent} "
                          "lies past its end")
        self._populate(extent.offset, end)
        return self._view[extent.offset : end]

    def _populate(self, start: int, end: int) -> None:
        """Fault in the slices of [start, end) this mapping has not touched yet.

        One MADV_POPULATE call per 4 MiB slice (GIL released) instead of a fault per
        page (per 4 KiB written, or 64 KiB read) during the copy: paid once per slice,
        by the first get or put that reaches it before the background prefault does.
        """
        for index in range(start // _PREFAULT_SLICE, (end - 1) // _PREFAULT_SLICE + 1):
            self._populate_slice(index)

    def _populate_slice(self, index: int) -> None:
        if not self._can_populate or self._populated[index]:
            return
        self._populated[index] = 1  # first: a racing thread faults pages as usual
        offset = index * _PREFAULT_SLICE
        self._can_populate = populate(self._map, offset, min(
            _PREFAULT_SLICE, self._view.nbytes - offset), writable=self._writable)

    def close(self) -> None:
        prefaulter = getattr(self, "_prefaulter", None)  # absent when __init__ failed
        if prefaulter is not None:
            self._stop_prefault.set()
            prefaulter.join()  # at most one slice (a few ms) away from returning
        self._view.release()
        try:
            self._map.close()
        except BufferError:  # views handed out are still alive; the GC unmaps later
            pass
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
