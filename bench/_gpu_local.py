"""GPU half of bench_local (imported only where CUDA exists; never run on the CI machine).

Measures H2D copies of the same bytes from the daemon's arena, registered with
cudaHostRegister, against cudaMemcpy from a pinned host buffer. bench_gpu_io.py
runs it too, beside CUDA IPC get vs D2D and kvikio vs POSIX reads.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np


def _best(fn: Callable[[], Any], repeat: int) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def bench_gpu(address: str, layout: Any, repeat: int, emit: Callable[..., None]) -> None:
    import torch

    from kvstore import Client

    chunks = 64
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, 49152, size=chunks * layout.chunk_tokens).tolist()
    kv = rng.standard_normal(layout.shape(len(tokens)), dtype=np.float32).astype(np.float16)
    with Client(address, "gpu", layout, transport="arena") as client:
        client.put(tokens, kv)
        with client.lease(tokens) as lease:
            first, last = lease.extents[0], lease.extents[-1]
            span = last.offset + last.length - first.offset
            view = lease.reader.view(type(first)(first.offset, span))
            host = torch.frombuffer(view, dtype=torch.uint8)
            cudart = torch.cuda.cudart()
            registered = cudart.cudaHostRegister(host.data_ptr(), host.numel(), 0) == 0
            device = torch.empty(host.numel(), dtype=torch.uint8, device="cuda")
            pinned = torch.empty(host.numel(), dtype=torch.uint8, pin_memory=True)
            pinned.copy_(host)
            arena_s = _best(lambda: device.copy_(host, non_blocking=True), repeat)
            pinned_s = _best(lambda: device.copy_(pinned, non_blocking=True), repeat)
            if registered:
                cudart.cudaHostUnregister(host.data_ptr())
    gb = host.numel() / 1e9
    emit("local", "h2d_arena", gb_per_s=gb / arena_s, registered=registered,
         vs_pinned=pinned_s / arena_s, device=torch.cuda.get_device_name())
    emit("local", "h2d_pinned", gb_per_s=gb / pinned_s, device=torch.cuda.get_device_name())
