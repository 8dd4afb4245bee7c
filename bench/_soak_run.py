"""The soak's conductor: processes up, clients running, faults on schedule, summary out."""

from __future__ import annotations

import dataclasses
import logging
import random
import signal
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _soak_faults as faults
import psutil
from _procs import (
    DaemonProcess,
    RedisFactory,
    free_port,
    mount_tmpfs,
    start_cluster,
    unmount,
)
from _soak_client import SoakSpec, client_main
from _soak_summary import summarise
from _soak_writeback import run_writeback_phase

log = logging.getLogger(__name__)
MiB = 1 << 20
REDIS_PREFIX = "kvs:"  # tiers.redis.key_prefix's default


@dataclass
class Shared:
    """What the conductor and every client process share (multiprocessing primitives)."""

    stop: Any
    daemon_up: Any  # 0 while the daemon is being killed or restarted
    epoch: Any  # bumped when the daemon goes down and when it is back
    restarted_at: Any  # wall time the daemon was last back
    verify_round: Any  # bumped after each restart: clients re-read their ledger
    num_ops: Any
    results: Any  # (kind, client id, payload) from the clients

    @classmethod
    def make(cls, ctx: Any) -> Shared:
        return cls(ctx.Event(), ctx.Value("i", 1), ctx.Value("i", 0), ctx.Value("d", 0.0),
                   ctx.Value("i", 0), ctx.Value("q", 0), ctx.Queue())


class SoakRun:
    def __init__(self, ctx: Any, workdir: Path, spec: SoakSpec, args: Any,
                 duration_s: float) -> None:
        self.ctx, self.workdir, self.args, self.duration_s = ctx, workdir, args, duration_s
        self.rng = random.Random(args.seed)
        self.corrupt_modes = tuple(args.corrupt.split(","))
        if not set(self.corrupt_modes) <= set(faults.MODES):
            raise SystemExit(f"--corrupt takes some of {','.join(faults.MODES)}")
        self.disk_dir = workdir / "disk"
        self.is_tmpfs = False
        self.factory = RedisFactory(workdir / "redis")  # cleanup kills what it started
        self.cluster: Any = None
        address = f"127.0.0.1:{free_port()}"
        self.spec = dataclasses.replace(spec, address=address)
        self.daemon = DaemonProcess(workdir / "soak.toml", address, workdir / "daemon.log")
        self.shared = Shared.make(ctx)
        self.clients: list[Any] = []
        self.messages: dict[str, dict] = defaultdict(dict)  # kind -> client id -> payload
        self.verify_kinds: dict[int, str] = {}
        self.fault_log: list[dict[str, Any]] = []
        self.rss: dict[str, float] = {}
        self.started_wall = 0.0
        self.counters: dict[str, Counter] = {}  # tier -> counters summed over daemon lives
        self._collector = threading.Thread(target=self._collect, daemon=True)

    def _write_config(self, path: Path, address: str) -> None:
        a = self.args
        path.write_text(
            f'[server]\nlisten = "{address}"\ndrain_timeout_s = 5.0\nio_threads = 4\n'
            f'[engine]\nwrite_policy = "write-through"\n'
            f'[tiers.cpu]\ncapacity_bytes = "{a.cpu_mib}MiB"\nlease_ttl_s = 5.0\n'
            f'[tiers.disk]\npath = "{self.disk_dir}"\ncapacity_bytes = "{a.disk_mib}MiB"\n'
            f'fsync = true\n'
            f'[tiers.redis]\nurl = "{self.cluster.cluster_url}"\ntimeout_s = 0.5\n')

    # ------------------------------------------------------------ the run

    def run(self) -> dict[str, Any]:
        self.is_tmpfs = mount_tmpfs(self.disk_dir, self.args.disk_mib * MiB * 5 // 4)
        self.cluster = start_cluster(self.factory, with_replicas=True)
        self._write_config(self.daemon.config_file, self.spec.address)
        self.daemon.start()
        self.rss["start_mib"] = self._rss_mib()
        self._collector.start()
        for i in range(self.args.processes):
            p = self.ctx.Process(target=client_main, args=(i, self.spec, self.shared),
                                 daemon=True)
            p.start()
            self.clients.append(p)
        self._wait_for("ready", len(self.clients), timeout_s=300)
        started, self.started_wall = time.monotonic(), time.time()
        self._run_schedule(started)
        self._wait_for_verify(self.shared.verify_round.value, timeout_s=120)
        self.rss["end_mib"] = self._rss_mib()
        elapsed_s = time.monotonic() - started
        self.shared.stop.set()
        self._wait_for("final", len(self.clients), timeout_s=120)
        self._add_counters()
        writeback = None
        if self.args.writeback_seconds > 0:
            writeback = run_writeback_phase(self.ctx, self.workdir, self.spec,
                                            self.args.writeback_writers,
                                            self.args.writeback_seconds,
                                            self.args.flush_interval_s)
        return summarise(self, elapsed_s, self.counters, writeback)

    def _schedule(self) -> list[tuple[str, Any]]:
        hold_s = max(3.0, self.duration_s * 0.05)
        return [
            ("corrupt_disk_files", lambda: faults.corrupt_disk_files(
                self.disk_dir, self._victims(), self.rng, self.corrupt_modes)),
            ("kill_9_redis_master", lambda: faults.kill_master_with_replica(
                self.cluster, 0, hold_s)),
            ("corrupt_redis_values", lambda: faults.corrupt_redis_values(
                self.cluster, self._victims(), REDIS_PREFIX, self.rng, self.corrupt_modes)),
            ("kill_9_client_holding_leases", self._kill_leaser),
            ("disk_full", lambda: self._disk_full(hold_s)),
            ("kill_9_daemon", lambda: self._restart("kill_9")),
            ("kill_9_redis_master_without_replica", lambda: faults.kill_master_without_replica(
                self.cluster, 1, hold_s)),
            ("graceful_restart", lambda: self._restart("graceful")),
        ]

    def _run_schedule(self, started: float) -> None:
        schedule = self._schedule()
        bar = _progress(self.duration_s, self.args.no_progress)
        ticking = threading.Event()
        if bar:
            threading.Thread(target=self._tick, args=(bar, started, ticking), daemon=True).start()
        for i, (name, inject) in enumerate(schedule):
            at = self.duration_s * (i + 1) / (len(schedule) + 1)
            self._sleep_until(started, at)
            t0 = time.monotonic()
            bar.set_description(name) if bar else None
            try:
                details = inject()
            except Exception as exc:  # noqa: BLE001 - a fault that could not run is reported
                log.exception("fault %s failed", name)
                details = {"error": f"{type(exc).__name__}: {exc}"}
            self.fault_log.append({"fault": name, "at_s": round(t0 - started, 1),
                                   "took_s": round(time.monotonic() - t0, 2), **details})
        self._sleep_until(started, self.duration_s)
        ticking.set()
        if bar:
            bar.close()

    @staticmethod
    def _sleep_until(started: float, at_s: float) -> None:
        while (now := time.monotonic() - started) < at_s:
            time.sleep(min(1.0, at_s - now))

    def _tick(self, bar: Any, started: float, done: threading.Event) -> None:
        while not done.wait(1.0):
            bar.n = min(int(time.monotonic() - started), bar.total)
            bar.set_postfix(ops=self.shared.num_ops.value, refresh=False)
            bar.refresh()

    # ------------------------------------------------------------ faults needing the run

    def _victims(self) -> list[str]:
        return faults.victim_keys(self.spec, self.args.processes)

    def _restart(self, kind: str) -> dict[str, Any]:
        sh = self.shared
        sh.daemon_up.value = 0
        sh.epoch.value += 1
        rss = self._rss_mib()
        self._add_counters()
        code = self.daemon.stop(signal.SIGKILL if kind == "kill_9" else signal.SIGTERM)
        t0 = time.monotonic()
        self.daemon.start()
        sh.restarted_at.value = time.time()
        sh.epoch.value += 1
        sh.daemon_up.value = 1
        self.verify_kinds[sh.verify_round.value + 1] = kind
        sh.verify_round.value += 1
        return {"exit_code": code, "restart_s": round(time.monotonic() - t0, 2),
                "rss_before_mib": rss}

    def _kill_leaser(self) -> dict[str, Any]:
        ready = self.ctx.Queue()
        proc = self.ctx.Process(target=faults.leaser_main, args=(self.spec, 6, ready),
                                daemon=True)
        proc.start()
        num_leased = ready.get(timeout=120)
        held = self._leases()
        faults.kill_process(proc.pid)
        proc.join(timeout=10)
        time.sleep(5.0 + 1.5)  # tiers.cpu.lease_ttl_s, then the expiry sweep
        return {"chunks_leased": num_leased, "leases_held_before_kill": held,
                "leases_held_after_ttl": self._leases()}

    def _disk_full(self, hold_s: float) -> dict[str, Any]:
        if not self.is_tmpfs:
            return {"skipped": "no tmpfs (needs root and mount): the disk was not filled"}
        filler, size = faults.fill_disk(self.disk_dir)
        time.sleep(hold_s)
        filler.unlink()
        return {"filler_mib": round(size / MiB, 1), "held_s": hold_s}

    # ------------------------------------------------------------ helpers

    def _rss_mib(self) -> float | None:
        try:
            return round(psutil.Process(self.daemon.pid).memory_info().rss / MiB, 1)
        except (psutil.Error, AssertionError):
            return None

    def _stats(self) -> dict[str, Any] | None:
        from kvstore.client import fetch_stats
        from kvstore.errors import KVStoreError

        try:
            return fetch_stats(self.spec.address, timeout_s=5)
        except KVStoreError:
            return None

    def _leases(self) -> int | None:
        stats = self._stats()
        for tier in (stats or {}).get("tiers", []):
            if "leases" in tier["info"]:
                return int(tier["info"]["leases"])
        return None

    def _add_counters(self) -> None:
        """Add the daemon's tier counters to the run's (they restart with the daemon)."""
        stats = self._stats() or {"tiers": []}
        for t in stats["tiers"]:
            mine = self.counters.setdefault(t["name"], Counter())
            mine.update({k: t[k] for k in ("hits", "misses", "corrupt", "errors", "evictions")})
            if "deletes_unconfirmed" in t["info"]:  # Redis deletes that left a tombstone
                mine["deletes_unconfirmed"] += int(t["info"]["deletes_unconfirmed"])

    def _collect(self) -> None:
        while True:
            kind, client_id, payload = self.shared.results.get()
            if kind == "verify":
                round_, result = payload
                self.messages[f"verify-{client_id}"][round_] = result
            self.messages[kind][client_id] = payload

    def _wait_for(self, kind: str, count: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.messages[kind]) < count and time.monotonic() < deadline:
            time.sleep(0.2)

    def _wait_for_verify(self, round_: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            done = sum(round_ in self.messages[f"verify-{i}"] for i in range(len(self.clients)))
            if round_ == 0 or done >= len(self.clients):
                return
            time.sleep(0.2)

    def verify_results(self) -> dict[str, Counter]:
        """Per restart kind: slots checked, lost, errors (summed over rounds and clients)."""
        out: dict[str, Counter] = defaultdict(Counter)
        ages: dict[str, list[float]] = defaultdict(list)
        for i in range(len(self.clients)):
            for round_, result in self.messages[f"verify-{i}"].items():
                kind = self.verify_kinds.get(round_, "?")
                out[kind].update({k: result[k] for k in ("checked", "lost", "errors")})
                out[kind].update({f"error:{k}": n for k, n in result["error_kinds"].items()})
                ages[kind] += result["lost_ages_s"]
        for kind, a in ages.items():
            out[kind]["oldest_lost_age_s"] = round(max(a), 2) if a else None
        return out

    def cleanup(self) -> None:
        self.shared.stop.set()
        for p in self.clients:
            p.join(timeout=10)
            if p.is_alive():
                faults.kill_process(p.pid)
        self.daemon.stop(signal.SIGTERM, timeout_s=30)
        self.factory.kill_all()
        if self.is_tmpfs:
            unmount(self.disk_dir)


def _progress(total_s: float, disabled: bool) -> Any:
    if disabled:
        return None
    from tqdm import tqdm

    return tqdm(total=int(total_s), unit="s", desc="soak", file=None, dynamic_ncols=True)

