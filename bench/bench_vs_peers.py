"""kvstore against Mooncake Store and LMCache on one machine: same-host put and get.

The workload of issue #16's table: requests of ``--tokens`` tokens (1024 by default)
of Llama-8B-shaped fp16 KV, 128 KiB per token (128 MiB per request), ``--requests``
requests (10), p50 per system. A warm memcpy of the same bytes is measured in the
same run as the baseline. The peers run from their own venvs (their dependencies
clash with ours); a venv not given, or one whose peer fails to run, prints a
"skipped" line saying why. How to make the venvs: bench/README.md.

- kvstore: a daemon (DRAM only) in a subprocess; ``Client.put`` (same-host put:
  reserve, write the objects into the arena, commit) of a new sequence per request,
  then ``Client.get(out=buffer)`` of it.
- Mooncake Store: ``bench/_peer_mooncake.py`` in the Mooncake venv: master, a
  standalone client process owning the segment, zero-copy ``put_from`` /
  ``get_into`` with registered buffers.
- LMCache: ``lmcache server`` (L1 CPU cache) driven by ``lmcache bench server --mode
  cpu`` (its own tool: cold stores, then warm retrieves), p50s as it reports them.

    python bench/bench_vs_peers.py --lmcache-venv /work/wt/peers/lmcache \\
        --mooncake-venv /work/wt/peers/mooncake
    python bench/bench_vs_peers.py --tokens 256 --requests 2     # smoke: peers skipped
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import daemon, emit, free_port  # noqa: E402

from kvstore import Client, KVLayout  # noqa: E402

BENCH = Path(__file__).resolve().parent
LLAMA8B = KVLayout(num_layers=32, num_kv_heads=8, head_dim=128, dtype="float16",
                   chunk_tokens=256)


def _p50_ms(seconds: list[float]) -> float:
    return round(float(np.percentile(seconds, 50)) * 1e3, 2)


def _timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_memcpy(num_tokens: int, requests: int) -> float:
    """p50 ms of a numpy copy of one request's bytes into a reused (warm) buffer."""
    kv = np.random.default_rng(0).standard_normal(LLAMA8B.shape(num_tokens),
                                                  dtype=np.float32).astype(np.float16)
    warm = np.empty_like(kv)
    np.copyto(warm, kv)
    return _p50_ms([_timed(lambda: np.copyto(warm, kv)) for _ in range(requests)])


def bench_kvstore(num_tokens: int, requests: int) -> dict[str, Any]:
    rng = np.random.default_rng(1)
    kv = rng.standard_normal(LLAMA8B.shape(num_tokens), dtype=np.float32).astype(np.float16)
    out = np.empty_like(kv)
    seqs = [rng.integers(0, 128_000, num_tokens).tolist() for _ in range(requests + 1)]
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "kvstore.toml"
        config.write_text(f"[tiers.cpu]\ncapacity_bytes = {(requests + 3) * kv.nbytes}\n"
                          "[tiers.disk]\nenabled = false\n")
        with daemon(Path(tmp) / "data", "--config", str(config)) as address, \
                Client(address, "peers", LLAMA8B) as client:
            client.put(seqs[0], kv)  # maps the arena (read-write and read-only) ...
            client.get(seqs[0], out=out)
            time.sleep(5)  # ... and lets both background prefaults finish
            put_s, get_s = [], []
            for tokens in seqs:  # the first request (already stored) is a warm-up
                put_s.append(_timed(lambda t=tokens: client.put(t, kv)))
                get_s.append(_timed(lambda t=tokens: client.get(t, out=out)))
            assert out.tobytes() == kv.tobytes(), "kvstore get is not bit-exact"
    return {"put_p50_ms": _p50_ms(put_s[1:]), "get_p50_ms": _p50_ms(get_s[1:])}


def _venv_python(venv: str | None, name: str) -> tuple[str | None, str]:
    if not venv:
        return None, f"no --{name}-venv given"
    python = Path(venv) / "bin" / "python"
    if not python.exists():
        return None, f"{python} does not exist"
    return str(python), ""


def bench_mooncake(venv: str | None, num_tokens: int, requests: int) -> dict[str, Any]:
    python, why = _venv_python(venv, "mooncake")
    if python is None:
        return {"skipped": True, "reason": why}
    proc = subprocess.run([python, str(BENCH / "_peer_mooncake.py"), "--tokens",
                           str(num_tokens), "--requests", str(requests)],
                          capture_output=True, text=True, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"skipped": True, "reason": f"mooncake run failed: {proc.stderr[-800:]}"}
    got = json.loads(lines[-1])
    return {"put_p50_ms": _p50_ms(got["put_s"]), "get_p50_ms": _p50_ms(got["get_s"]),
            "version": got["version"]}


def _find(tree: Any, key: str) -> Any:
    """The value of ``key`` anywhere in a JSON tree (LMCache nests its metrics)."""
    if isinstance(tree, dict):
        if key in tree:
            value = tree[key]
            return value.get("value") if isinstance(value, dict) else value
        tree = list(tree.values())
    if isinstance(tree, list):
        for item in tree:
            found = _find(item, key)
            if found is not None:
                return found
    return None


def bench_lmcache(venv: str | None, num_tokens: int, requests: int) -> dict[str, Any]:
    python, why = _venv_python(venv, "lmcache")
    if python is None:
        return {"skipped": True, "reason": why}
    cli = str(Path(venv) / "bin" / "lmcache")
    env = {**os.environ, "LMCACHE_TRACK_USAGE": "false", "LMCACHE_DISABLE_BANNER": "1"}
    port, http_port = free_port(), free_port()
    gb = max(2, (requests + 2) * num_tokens * 131072 // (1 << 30) + 1)
    with tempfile.TemporaryDirectory() as tmp:
        log = open(Path(tmp) / "server.log", "w")
        server = subprocess.Popen(
            [cli, "server", "--host", "127.0.0.1", "--port", str(port), "--http-port",
             str(http_port), "--l1-size-gb", str(gb), "--eviction-policy", "LRU",
             "--chunk-size", "256", "--supported-transfer-mode", "auto",
             "--disable-observability"], stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 300
            while "Uvicorn running" not in (Path(tmp) / "server.log").read_text():
                if server.poll() is not None or time.monotonic() > deadline:
                    return {"skipped": True, "reason": "lmcache server did not start"}
                time.sleep(1)
            output = Path(tmp) / "bench.json"
            proc = subprocess.run(
                [cli, "bench", "server", "--mode", "cpu", "--rpc-url",
                 f"tcp://127.0.0.1:{port}", "--url", f"http://127.0.0.1:{http_port}",
                 "--num-tokens", str(num_tokens), "--start", "0", "--end",
                 str(requests), "--interval", "0", "--format", "json", "--output",
                 str(output), "-q"], capture_output=True, text=True, timeout=900, env=env)
            if proc.returncode != 0 or not output.exists():
                return {"skipped": True,
                        "reason": f"lmcache bench failed: {(proc.stdout + proc.stderr)[-800:]}"}
            got = json.loads(output.read_text())
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
            log.close()
    put, get = _find(got, "cold_store_p50"), _find(got, "warm_retrieve_p50")
    if put is None or get is None:
        return {"skipped": True, "reason": f"no p50s in lmcache's output: {str(got)[:400]}"}
    return {"put_p50_ms": float(put), "get_p50_ms": float(get), "version": "0.5.6"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per request")
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--lmcache-venv", help="venv holding LMCache (bench/README.md)")
    parser.add_argument("--mooncake-venv", help="venv holding Mooncake (bench/README.md)")
    args = parser.parse_args(argv)
    common = {"tokens": args.tokens, "requests": args.requests,
              "bytes": args.tokens * LLAMA8B.chunk_bytes // LLAMA8B.chunk_tokens}
    memcpy_ms = bench_memcpy(args.tokens, args.requests)
    emit("vs_peers", "memcpy_warm", p50_ms=memcpy_ms, **common)
    ours = bench_kvstore(args.tokens, args.requests)
    emit("vs_peers", "kvstore", **ours, put_vs_memcpy=round(memcpy_ms / ours["put_p50_ms"], 3),
         get_vs_memcpy=round(memcpy_ms / ours["get_p50_ms"], 3), **common)
    for name, run in (("mooncake", lambda: bench_mooncake(args.mooncake_venv, args.tokens,
                                                         args.requests)),
                      ("lmcache", lambda: bench_lmcache(args.lmcache_venv, args.tokens,
                                                        args.requests))):
        theirs = run()
        if theirs.get("skipped"):
            emit("vs_peers", name, skipped=True, reason=theirs["reason"], **common)
            continue
        # > 1: kvstore is faster by that factor.
        emit("vs_peers", name, **theirs,
             kvstore_put_speedup=round(theirs["put_p50_ms"] / ours["put_p50_ms"], 2),
             kvstore_get_speedup=round(theirs["get_p50_ms"] / ours["get_p50_ms"], 2), **common)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
