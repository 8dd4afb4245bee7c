"""The soak benchmark, short: 4 client processes for 60 s under every scheduled fault.

Runs ``bench/soak.py`` as a user would and checks its summary: no wrong bytes, no
chunk read back after its delete was acknowledged, no failed call that a miss could
have answered, nothing acknowledged under write-through lost across a kill -9 or a
graceful restart, and the daemon's RSS bounded.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.redis, pytest.mark.timeout(600)]

SOAK = Path(__file__).resolve().parents[1] / "bench" / "soak.py"
FAULTS = {"corrupt_disk_files", "kill_9_redis_master", "corrupt_redis_values",
          "kill_9_client_holding_leases", "disk_full", "kill_9_daemon",
          "kill_9_redis_master_without_replica", "graceful_restart"}
RSS_GROWTH_BOUND_MIB = 128  # above the daemon's RSS at start (its arena is prefaulted)
# Every corruption the soak knows, "swapped" included (another chunk's valid object
# copied over a victim's file or Redis value: a key-record mismatch, so a miss).
CORRUPT = "bit_flipped,truncated,swapped"


@pytest.fixture(scope="module")
def summary(tmp_path_factory: pytest.TempPathFactory) -> dict:
    workdir = tmp_path_factory.mktemp("soak")
    proc = subprocess.run(
        [sys.executable, str(SOAK), "--processes", "4", "--seconds", "60",
         "--writeback-seconds", "4", "--writeback-writers", "2", "--no-progress",
         "--corrupt", CORRUPT, "--workdir", str(workdir)],
        capture_output=True, text=True, timeout=540)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, f"soak printed no summary (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1])


def test_soak_returns_no_wrong_bytes_under_faults(summary: dict) -> None:
    assert summary["clients_reporting"] == 4
    assert summary["ops"] > 1000
    assert summary["wrong_bytes"] == 0, summary["wrong_chunks"]
    assert {f["fault"] for f in summary["faults"]} == FAULTS
    assert not [f for f in summary["faults"] if "error" in f]


def test_soak_never_reads_back_an_acknowledged_delete(summary: dict) -> None:
    # A delete acknowledged while a Redis master is down must survive its failover.
    assert summary["resurrected_after_delete"] == 0, summary["resurrected_examples"]


def test_soak_fails_no_call_a_miss_could_answer(summary: dict) -> None:
    assert summary["failed_calls"] == 0, summary["failed_examples"]


def test_soak_write_through_loses_nothing_across_restarts(summary: dict) -> None:
    for kind in ("graceful", "kill_9"):
        result = summary["lost_writes"][kind]
        assert result["checked"] > 0 and result["errors"] == 0, result
        assert result["lost"] == 0, result
    wb = summary["write_back_kill_9"]
    assert wb["acknowledged_puts"] > 0 and wb["wrong_chunks"] == 0


def test_soak_daemon_rss_stays_bounded(summary: dict) -> None:
    rss = summary["daemon_rss_mib"]
    assert rss["end_mib"] <= rss["start_mib"] + RSS_GROWTH_BOUND_MIB, rss
