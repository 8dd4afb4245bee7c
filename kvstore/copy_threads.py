"""Same-host copies and checksums split across CPU cores: whole objects per thread.

Used by the client's same-host get and put (copy + hash of each chunk) and by the
daemon's CommitExtents (the hash of each chunk a client wrote into the arena).

Why: a verified copy is a memory-bound copy followed by a CPU-bound hash (XXH3
measured 6-16 GB/s in cache on the loaded 2-core VM, against a ~5 GB/s memcpy),
so one thread pays copy + hash in sequence. ``np.copyto`` and ``xxhash.update``
release the GIL on large buffers, so a second thread copying and hashing other
objects runs truly in parallel: on 2 cores a 128 MiB verified get is then as fast
as a single-threaded memcpy of the same bytes, or faster (bench/README.md,
"Same-host request"). Each object stays on one thread because its checksum is one
sequential XXH3 stream.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from kvstore.errors import InvalidArgument

# Below this many bytes a request is copied on the caller's thread alone: handing
# work to another thread costs tens of microseconds, a 4 MiB copy about a millisecond.
MIN_SPLIT_BYTES = 4 << 20


def default_copy_threads() -> int:
    """Threads a same-host copy uses by default: 2 where this process may use 2 cores."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return min(2, cores)


class CopyThreads:
    """Runs a request's per-object copy jobs on up to ``num_threads`` threads.

    Args:
        num_threads: threads per request, the caller's own included; None picks
            ``default_copy_threads()``. 1 copies on the caller's thread only.

    Raises:
        InvalidArgument: ``num_threads`` is not a positive integer.
    """

    def __init__(self, num_threads: int | None = None) -> None:
        if num_threads is None:
            num_threads = default_copy_threads()
        if not isinstance(num_threads, int) or isinstance(num_threads, bool) or num_threads < 1:
            raise InvalidArgument(f"copy_threads must be a positive integer or None, got "
                                  f"{num_threads!r}")
        self.num_threads = num_threads
        self._pool: ThreadPoolExecutor | None = None  # started at the first split
        self._lock = threading.Lock()

    def run(self, jobs: Sequence[Callable[[], None]], total_bytes: int) -> None:
        """Run every job; returns once all have ended (none is left writing).

        Jobs are split into contiguous groups, one per thread; a group stops at its
        first failure. Raises the failure of the earliest failed job, after every
        group has stopped.
        """
        groups = min(self.num_threads, len(jobs))
        if groups < 2 or total_bytes < MIN_SPLIT_BYTES:
            for job in jobs:
                job()
            return
        bounds = [len(jobs) * g // groups for g in range(groups + 1)]
        pool = self._started()
        futures: list[Future[None]] = [pool.submit(_run_group, jobs[bounds[g]:bounds[g + 1]])
                                       for g in range(1, groups)]
        first: BaseException | None = None
        try:
            _run_group(jobs[: bounds[1]])
        except BaseException as exc:  # noqa: BLE001 - re-raised once the others have ended
            first = exc
        for future in futures:  # in job order: the earliest failure wins
            failure = future.exception()
            if first is None and failure is not None:
                first = failure
        if first is not None:
            raise first

    def _started(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.num_threads - 1,
                                                thread_name_prefix="kvstore-copy")
            return self._pool

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)


def _run_group(jobs: Sequence[Callable[[], None]]) -> None:
    for job in jobs:
        job()
