"""The soak's one JSON summary, from the clients' tallies and the conductor's records."""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

import numpy as np
from _soak_client import OPS


def summarise(run: Any, elapsed_s: float, counters: dict[str, Any],
              writeback: dict[str, Any] | None) -> dict[str, Any]:
    finals = list(run.messages["final"].values())
    ops: Counter = Counter()
    latency: dict[str, list[float]] = defaultdict(list)
    misses, wrong_chunks, failed = Counter(), Counter(), Counter()
    examples: list[str] = []
    for f in finals:
        ops.update(f["ops"])
        misses.update(f["misses"])
        wrong_chunks.update(f["wrong_chunks"])
        failed.update(f["failed"])
        examples += f["failed_examples"]
        for op, values in f["latency_ms"].items():
            latency[op] += values
    verify = run.verify_results()
    wrong_bytes = sum(f["wrong_bytes"] for f in finals)
    spec = run.spec
    return {
        "processes": run.args.processes, "clients_reporting": len(finals),
        "duration_s": round(elapsed_s, 1),
        "layout": {"layers": spec.num_layers, "kv_heads": spec.num_kv_heads,
                   "head_dim": spec.head_dim, "chunk_tokens": spec.chunk_tokens,
                   "dtype": "float16", "chunk_bytes": spec.layout().chunk_bytes},
        "sequences": run.args.processes * spec.num_slots,
        "ops": sum(ops.values()), "ops_per_s": round(sum(ops.values()) / elapsed_s, 1),
        "ops_by_kind": {op: ops[op] for op in OPS},
        "latency": {op: percentiles(latency[op]) for op in OPS},
        "failed_calls": sum(failed.values()), "failed_by_kind": dict(failed),
        "failed_examples": examples[:8],
        "unavailable_while_daemon_restarting": sum(f["unavailable_restart"] for f in finals),
        "refused_puts": sum(f["refused_puts"] for f in finals),
        "misses": dict(misses), "wrong_chunks": dict(wrong_chunks), "wrong_bytes": wrong_bytes,
        "wrong_examples": [dict(e, at_s=round(e.pop("at_wall_s") - run.started_wall, 1))
                           for f in finals for e in f["wrong_examples"]][:6],
        "resurrected_after_delete": sum(f["resurrected"] for f in finals),
        "resurrected_examples": [dict(e, at_s=round(e.pop("at_wall_s") - run.started_wall, 1))
                                 for f in finals for e in f["resurrected_examples"]][:6],
        "lost_writes": {kind: dict(c) for kind, c in verify.items()},
        "lost_write_through_graceful": verify.get("graceful", {}).get("lost"),
        "lost_write_through_kill_9": verify.get("kill_9", {}).get("lost"),
        "write_back_kill_9": writeback,
        "faults": run.fault_log,
        "disk": "tmpfs" if run.is_tmpfs else "plain directory (no tmpfs: disk_full skipped)",
        "daemon_rss_mib": run.rss, "daemon_counters": counters,
        "config": {"cpu_mib": run.args.cpu_mib, "disk_mib": run.args.disk_mib,
                   "write_policy": "write-through", "redis": "3 masters + 3 replicas"},
    }


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    arr = np.asarray(values)
    return {"n": len(values), "p50_ms": round(float(np.percentile(arr, 50)), 2),
            "p99_ms": round(float(np.percentile(arr, 99)), 2)}
