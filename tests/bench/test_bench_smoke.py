"""Every benchmark runs end to end on tiny sizes and prints well-formed JSON lines.

Benchmarks report figures; these tests only prove the scripts still work, so a
figure in bench/README.md can always be reproduced.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"

FAST = {
    "bench_store.py": ["--chunks", "2", "--repeat", "1"],
    "bench_local.py": ["--mb", "12", "--repeat", "1", "--request-tokens", "256",
                       "--request-repeat", "2"],
    "bench_vs_peers.py": ["--tokens", "256", "--requests", "2"],
    "bench_redis.py": ["--smoke"],
    "bench_codec.py": ["--smoke"],
    "bench_codec_gpu.py": ["--smoke"],
    "bench_gpu_io.py": ["--smoke"],
    "bench_sparse_gpu.py": ["--smoke"],
    "bench_blob_parts.py": ["--smoke"],
    "bench_micro.py": ["--smoke"],
    "bench_durability.py": ["--smoke"],
    "bench_connectors.py": ["--smoke"],
}
WITH_MODEL = {
    "bench_ttft.py": ["--sizes", "256", "--repeat", "1", "--chunk-tokens", "128", "--no-plot",
                      "--codecs", "raw,balanced"],
    "bench_rag.py": ["--prompts", "1", "--chunks", "2", "--chunk-tokens", "64",
                     "--answer-tokens", "4", "--ratios", "0.15", "--min-speedups", "3",
                     "--codecs", "raw,balanced"],
    "bench_sparse.py": ["--smoke"],
}


def _run(script: str, args: list[str], timeout_s: float) -> list[dict]:
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True,
                          text=True, timeout=timeout_s)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stderr[-4000:]}"
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, f"{script} printed no JSON lines:\n{proc.stdout[-2000:]}"
    return lines


def test_every_benchmark_has_a_smoke_entry() -> None:
    scripts = {p.name for p in BENCH.glob("bench_*.py")}
    assert scripts == set(FAST) | set(WITH_MODEL)


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(FAST))
def test_benchmark_runs_on_tiny_sizes(script: str) -> None:
    _run(script, FAST[script], timeout_s=300)


@pytest.mark.slow
@pytest.mark.model
@pytest.mark.parametrize("script", sorted(WITH_MODEL))
def test_model_benchmark_runs_on_tiny_sizes(script: str) -> None:
    _run(script, WITH_MODEL[script], timeout_s=600)
