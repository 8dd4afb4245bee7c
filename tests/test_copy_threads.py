"""CopyThreads: per-object copy jobs split across threads, failures raised once all stopped."""

from __future__ import annotations

import threading
import time

import pytest

from kvstore.copy_threads import MIN_SPLIT_BYTES, CopyThreads, default_copy_threads
from kvstore.errors import Corrupt, InvalidArgument


def _recording_jobs(count: int, seen: list[tuple[int, str]]) -> list:
    def job(i: int):
        def run() -> None:
            time.sleep(0.01)  # long enough for both threads to be busy at once
            seen.append((i, threading.current_thread().name))
        return run
    return [job(i) for i in range(count)]


def test_large_requests_split_into_contiguous_groups_one_per_thread():
    threads = CopyThreads(2)
    try:
        seen: list[tuple[int, str]] = []
        threads.run(_recording_jobs(5, seen), MIN_SPLIT_BYTES)
        by_job = dict(seen)
        assert sorted(by_job) == [0, 1, 2, 3, 4]
        caller = threading.current_thread().name
        assert {by_job[i] for i in (0, 1)} == {caller}  # the first group: this thread
        assert {by_job[i] for i in (2, 3, 4)} == {by_job[2]} != {caller}
        assert by_job[2].startswith("kvstore-copy")
    finally:
        threads.close()


def test_small_requests_and_one_thread_stay_on_the_calling_thread():
    caller = threading.current_thread().name
    for threads, total_bytes in ((CopyThreads(2), MIN_SPLIT_BYTES - 1),
                                 (CopyThreads(1), 1 << 30)):
        seen: list[tuple[int, str]] = []
        threads.run(_recording_jobs(4, seen), total_bytes)
        assert seen == [(i, caller) for i in range(4)]
        threads.close()


def test_the_earliest_failure_is_raised_after_every_thread_has_stopped():
    threads = CopyThreads(2)
    finished: list[int] = []

    def slow_ok() -> None:
        time.sleep(0.2)
        finished.append(0)

    def fail(message: str):
        def run() -> None:
            raise Corrupt(message)
        return run

    def never() -> None:
        finished.append(9)  # after a failure in its group: not run

    try:
        # groups: [slow_ok, fail("first")] on this thread, [fail("second"), never] on the worker
        with pytest.raises(Corrupt, match="first"):
            threads.run([slow_ok, fail("first"), fail("second"), never], MIN_SPLIT_BYTES)
        assert finished == [0]
        with pytest.raises(Corrupt, match="worker"):  # a failure on the worker alone
            threads.run([slow_ok, fail("worker")], MIN_SPLIT_BYTES)
    finally:
        threads.close()


def test_copy_threads_must_be_a_positive_integer():
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(InvalidArgument, match="copy_threads"):
            CopyThreads(bad)
    assert CopyThreads(None).num_threads == default_copy_threads() >= 1
