"""Shared bits of the benchmarks: machine facts, JSON-lines output, timing, daemons."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def machine() -> dict[str, Any]:
    """What produced a figure: CPU, cores, Python and library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for name in ("numpy", "grpc", "torch", "redis", "kvstore"):
        mod = sys.modules.get(name)
        if mod is not None:
            versions[name] = getattr(mod, "__version__", "?")
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "versions": versions}


def emit(subject: str, name: str, **fields: Any) -> None:
    """Print one JSON line: {"bench": subject, "name": name, ...fields, "machine": {...}}."""
    print(json.dumps({"bench": subject, "name": name, **fields, "machine": machine()}),
          flush=True)


def best_seconds(fn: Callable[[], Any], repeat: int = 3, warmup: int = 1) -> float:
    """Best wall time of ``fn`` over ``repeat`` runs after ``warmup`` untimed runs."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def daemon(data_dir: Path, *extra: str) -> Iterator[str]:
    """Run `python -m kvstore serve` in a subprocess; yield its address; SIGTERM at the end."""
    import grpc

    address = f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvstore", "serve", "--listen", address,
         "--data-dir", str(data_dir), *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        channel = grpc.insecure_channel(address)
        grpc.channel_ready_future(channel).result(timeout=60)
        channel.close()
        yield address
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
