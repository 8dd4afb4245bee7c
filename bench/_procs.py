"""Real processes for benchmarks and tests: redis-server (standalone or a cluster), the daemon.

Shared by ``bench/soak.py`` and ``tests/redis_servers.py`` (which adds the pytest
fixtures); benchmarks never import the tests. Every process runs on a free loopback
port in its own directory, with Redis persistence off, and is killed by PID.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
NUM_SLOTS = 16384
_START_TIMEOUT_S = 10.0


def free_port(*, with_bus: bool = False) -> int:
    """A free loopback port; ``with_bus`` also needs port + 10000 free (cluster bus)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not with_bus:
            return port
        if port + 10000 < 65536 and _is_free(port + 10000):
            return port
    raise RuntimeError("no free loopback port pair for a cluster node")


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@dataclass(slots=True)
class RedisProcess:
    """One redis-server process; ``kill`` sends SIGKILL to its PID, ``start`` (re)starts it."""

    port: int
    workdir: Path
    args: list[str]
    config_file: str | None = None  # must come first on the command line (Sentinel)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        first = [self.config_file] if self.config_file else []
        cmd = [REDIS_SERVER, *first, "--port", str(self.port), "--bind", "127.0.0.1",
               "--save", "", "--appendonly", "no", "--dir", str(self.workdir),
               "--daemonize", "no", "--logfile", str(self.workdir / "redis.log"), *self.args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.wait_ready()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                log = (self.workdir / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server on {self.port} exited: {log}")
            try:
                if self.client().ping():
                    return
            except redis.RedisError:
                time.sleep(0.02)
        raise RuntimeError(f"redis-server on port {self.port} did not answer PING")

    def client(self, **kwargs) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2, **kwargs)

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL (kill -9) by PID and reap; idempotent."""
        if self.is_running():
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def pause(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)


@dataclass(slots=True)
class RedisFactory:
    """Starts redis-server processes and remembers them so teardown kills every one."""

    root: Path
    processes: list[RedisProcess] = field(default_factory=list)

    def server(self, *args: str, port: int | None = None, config_file: str | None = None,
               start: bool = True) -> RedisProcess:
        port = port or free_port()
        proc = RedisProcess(port, self.root / f"redis-{port}", list(args), config_file)
        self.processes.append(proc)
        if start:
            proc.start()
        return proc

    def kill_all(self) -> None:
        for proc in self.processes:
            try:
                proc.resume() if proc.is_running() else None
                proc.kill()
            except (OSError, subprocess.TimeoutExpired):
                pass


@dataclass(slots=True)
class RedisClusterProcs:
    """A running cluster: ``masters[i]`` owns slot range i; ``replicas[i]`` follows it."""

    masters: list[RedisProcess]
    replicas: list[RedisProcess]

    @property
    def cluster_url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{m.port}" for m in self.masters)

    def master_of_slot(self, slot: int) -> int:
        return slot * len(self.masters) // NUM_SLOTS


def start_cluster(factory: RedisFactory, *, num_masters: int = 3, with_replicas: bool = False,
                  node_timeout_ms: int = 1000) -> RedisClusterProcs:
    """Build a cluster by CLUSTER ADDSLOTSRANGE / MEET / REPLICATE (faster than redis-cli)."""
    args = ("--cluster-enabled", "yes", "--cluster-node-timeout", str(node_timeout_ms),
            "--cluster-require-full-coverage", "no", "--cluster-allow-reads-when-down", "yes")
    masters = [_cluster_node(factory, args) for _ in range(num_masters)]
    replicas = [_cluster_node(factory, args) for _ in range(num_masters if with_replicas else 0)]
    for i, m in enumerate(masters):
        lo, hi = i * NUM_SLOTS // num_masters, (i + 1) * NUM_SLOTS // num_masters - 1
        m.client().execute_command("CLUSTER ADDSLOTSRANGE", lo, hi)
    for node in masters[1:] + replicas:
        node.client().execute_command("CLUSTER MEET", "127.0.0.1", masters[0].port)
    wait_all_known(masters + replicas)
    for m, r in zip(masters[: len(replicas)], replicas, strict=True):
        master_id = m.client().execute_command("CLUSTER MYID")
        r.client().execute_command("CLUSTER REPLICATE", master_id)
    wait_state_ok(masters + replicas)
    wait_replicas_linked(replicas)
    return RedisClusterProcs(masters, replicas)


def _cluster_node(factory: RedisFactory, args: tuple[str, ...]) -> RedisProcess:
    port = free_port(with_bus=True)
    return factory.server(*args, "--cluster-config-file", f"nodes-{port}.conf", port=port)


def wait_all_known(nodes: list[RedisProcess], timeout_s: float = _START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        counts = [n.client().execute_command("CLUSTER INFO") for n in nodes]
        if all(info_field(c, "cluster_known_nodes") == str(len(nodes)) for c in counts):
            return
        time.sleep(0.05)
    raise RuntimeError("cluster nodes did not all meet")


def wait_state_ok(nodes: list[RedisProcess], timeout_s: float = _START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        infos = [n.client().execute_command("CLUSTER INFO") for n in nodes]
        if all(info_field(i, "cluster_state") == "ok" for i in infos):
            return
        time.sleep(0.05)
    raise RuntimeError("cluster did not reach cluster_state:ok")


def wait_replicas_linked(replicas: list[RedisProcess],
                         timeout_s: float = _START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        infos = [r.client().info("replication") for r in replicas]
        if all(i.get("master_link_status") == "up" for i in infos):
            return
        time.sleep(0.05)
    raise RuntimeError("replicas did not finish their initial sync")


def info_field(info: bytes | str | dict, name: str) -> str | None:
    if isinstance(info, dict):
        value = info.get(name)
        return None if value is None else str(value)
    text = info.decode() if isinstance(info, bytes) else info
    for line in text.splitlines():
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    return None


@dataclass(slots=True)
class DaemonProcess:
    """`python -m kvstore serve --config FILE` on a fixed loopback address; restartable."""

    config_file: Path
    address: str
    log_file: Path
    proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 60.0) -> None:
        from kvstore.client import fetch_stats
        from kvstore.errors import KVStoreError

        with open(self.log_file, "a") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kvstore", "serve", "--config", str(self.config_file),
                 "--log-level", "WARNING"], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fetch_stats(self.address, timeout_s=2)
                return
            except KVStoreError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop(signal.SIGKILL)
                    tail = self.log_file.read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"daemon did not start on {self.address}: {tail}") \
                        from None
                time.sleep(0.1)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60.0) -> int | None:
        """Send ``sig`` by PID and reap; returns the exit code (None if never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(timeout=10)


def mount_tmpfs(path: Path, size_bytes: int) -> bool:
    """Mount a tmpfs of ``size_bytes`` at ``path`` (needs root); False if it cannot."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes},mode=0700",
                           "tmpfs", str(path)], capture_output=True)
    return done.returncode == 0


def unmount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)
