"""Mooncake Store's side of bench_vs_peers.py; runs inside a venv holding Mooncake.

Starts ``mooncake_master`` (with its HTTP metadata server) and a standalone
``mooncake_client`` (the process that owns the store's memory segment) on free
loopback ports, then, from this process as a dummy client, times zero-copy
``put_from`` / ``get_into`` of ``--tokens`` tokens of Llama-8B-shaped KV (128 KiB
per token) from and into buffers allocated in the shared memory pool and
registered, as Mooncake's docs advise. Prints one JSON line:
{"put_s": [...], "get_s": [...], "bytes": N, "version": "..."}.

    <mooncake-venv>/bin/python bench/_peer_mooncake.py --tokens 1024 --requests 10
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from importlib import metadata

import numpy as np

BYTES_PER_TOKEN = 32 * 2 * 8 * 128 * 2  # Llama-3-8B: layers x K,V x kv heads x dim x fp16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on port {port} after {timeout_s} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--requests", type=int, default=10)
    args = parser.parse_args()
    from mooncake.store import MooncakeDistributedStore

    size = args.tokens * BYTES_PER_TOKEN
    bindir = os.path.dirname(sys.executable)
    rpc, meta, client_port = _free_port(), _free_port(), _free_port()
    logs = tempfile.TemporaryDirectory()
    procs = [subprocess.Popen(
        [f"{bindir}/mooncake_master", f"--rpc_port={rpc}", "--enable_http_metadata_server=true",
         f"--http_metadata_server_port={meta}", "--http_metadata_server_host=127.0.0.1"],
        stdout=open(f"{logs.name}/master.log", "w"), stderr=subprocess.STDOUT)]
    try:
        _wait_port(rpc)
        segment_gb = max(2, (args.requests + 2) * size // (1 << 30) + 1)
        procs.append(subprocess.Popen(
            [f"{bindir}/mooncake_client", f"--master_server_address=127.0.0.1:{rpc}",
             f"--metadata_server=http://127.0.0.1:{meta}/metadata", f"--port={client_port}",
             f"--global_segment_size={segment_gb} GB", "--host=127.0.0.1", "--protocol=tcp"],
            stdout=open(f"{logs.name}/client.log", "w"), stderr=subprocess.STDOUT))
        _wait_port(client_port)
        store = MooncakeDistributedStore()
        if store.setup_dummy(2 * size + (64 << 20), 64 << 20, f"127.0.0.1:{client_port}"):
            raise RuntimeError("mooncake setup_dummy failed")
        src, dst = store.alloc_from_mem_pool(size), store.alloc_from_mem_pool(size)
        for ptr in (src, dst):
            if store.register_buffer(ptr, size):
                raise RuntimeError("mooncake register_buffer failed")
        data = np.ctypeslib.as_array((ctypes.c_uint8 * size).from_address(src))
        data[:] = np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8)
        out = np.ctypeslib.as_array((ctypes.c_uint8 * size).from_address(dst))
        out[:] = 0
        put_s, get_s = [], []
        for i in range(args.requests + 1):  # the first is a warm-up
            start = time.perf_counter()
            if store.put_from(f"req-{i}", src, size) != 0:
                raise RuntimeError(f"mooncake put_from of request {i} failed")
            put_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            if store.get_into(f"req-{i}", dst, size) != size:
                raise RuntimeError(f"mooncake get_into of request {i} failed")
            get_s.append(time.perf_counter() - start)
        assert np.array_equal(out[:4096], data[:4096]), "mooncake returned other bytes"
        store.close()
        print(json.dumps({"put_s": put_s[1:], "get_s": get_s[1:], "bytes": size,
                          "version": metadata.version("mooncake-transfer-engine-non-cuda")}))
    finally:
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        logs.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
