"""The same-host GPU path end to end on a CPU: a real daemon on port 0 whose GPU tier
lives in a host-memory slab (tests.fakes.HostSlab), clients that open it, and the
fallbacks of a daemon without a GPU tier."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from kvstore._proto import kvstore_pb2 as pb
from kvstore._proto import kvstore_pb2_grpc as pb_grpc
from kvstore.client import AsyncClient, Client
from kvstore.client import _protocol as proto
from kvstore.client._gpu import GpuPath
from kvstore.config import GpuTierConfig
from kvstore.engine import Engine
from kvstore.server.app import ServerThread
from kvstore.tiers.cpu import CpuTier
from kvstore.tiers.disk import DiskTier
from kvstore.tiers.gpu import GpuTier
from tests.conftest import make_config, make_kv, make_tokens
from tests.fakes import HostSlab, open_host_slab

ROOT = Path(__file__).resolve().parent.parent.parent


def _host_gpu_path() -> GpuPath:
    """The client's GPU path with the host slab's opener, serving CPU output."""
    return GpuPath(open_host_slab, device_types=("cpu",))


@pytest.fixture
def gpu_server(tmp_path: Path, layout: Any) -> Iterator[tuple[ServerThread, GpuTier, HostSlab]]:
    """A daemon whose engine has a GPU tier of 6 chunks in a host slab."""
    config = make_config(tmp_path / "data", **{"tiers.cpu.shm_dir": str(tmp_path)})
    slab = HostSlab(6 * (layout.chunk_bytes + 1024), str(tmp_path))
    gpu = GpuTier(GpuTierConfig(capacity_bytes=slab.nbytes, promote_after_hits=100), slab)
    engine = Engine(config.engine, [CpuTier(config.tiers.cpu), DiskTier(config.tiers.disk)],
                    gpu=gpu)
    with ServerThread(config, engine) as server:
        yield server, gpu, slab
    engine.close()


def _lease(address: str, namespace: str, layout: Any, tokens: Any, ttl_ms: int = 0) -> Any:
    with grpc.insecure_channel(address) as channel:
        request = pb.LeaseGpuChunksRequest(
            namespace=proto.namespace_to_proto(namespace, layout, 0),
            tokens_le_i32=tokens.tobytes(), ttl_ms=ttl_ms)
        return pb_grpc.KVStoreStub(channel).LeaseGpuChunks(request, timeout=20)


def test_daemon_without_gpu_tier_answers_failed_precondition(client, layout, server):
    tokens, kv = make_tokens(64), make_kv(layout, 64)
    c = client()
    c.put(tokens, kv)
    with pytest.raises(grpc.RpcError) as info:
        _lease(server.address, "model@rev", layout, tokens)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "no GPU tier" in info.value.details()


def test_client_falls_back_to_the_arena_when_daemon_has_no_gpu(client, layout, server):
    tokens, kv = make_tokens(64), make_kv(layout, 64)
    c = client()
    c._gpu = _host_gpu_path()
    c.put(tokens, kv)
    sent = server.counters.sent_bytes
    got = c.get(tokens, device="cpu")
    assert torch.equal(got, torch.from_numpy(kv))
    assert server.counters.sent_bytes == sent  # the arena served it, not the stream
    assert c._gpu.is_refused(0)
    c.get(tokens, device="cpu")  # not asked again
    assert server.counters.snapshot().requests["LeaseGpuChunks"] == 1


def test_gpu_lease_get_copies_from_the_slab(gpu_server, layout):
    server, gpu, slab = gpu_server
    tokens, kv = make_tokens(64), make_kv(layout, 64)
    with Client(server.address, "m", layout) as c:
        c._gpu = _host_gpu_path()
        c.put(tokens, kv)
        sent = server.counters.sent_bytes
        assert torch.equal(c.get(tokens, device="cpu"), torch.from_numpy(kv))
        assert c._gpu.is_open(0)  # read through the slab, not a fallback
        assert torch.equal(c.get(tokens, layers=[1, 3], device="cpu"),
                           torch.from_numpy(kv[[1, 3]]))
        assert server.counters.sent_bytes == sent
        assert slab.num_uploads == 4  # placed once, then leased from HBM
        assert gpu.num_leases() == 0  # released after each copy
        assert gpu.stats().num_objects == 4
        rag = make_tokens(7, seed=3)
        c.put_chunk(rag, make_kv(layout, 7, seed=3))
        assert torch.equal(c.get_chunk(rag, device="cpu"), torch.from_numpy(
            make_kv(layout, 7, seed=3)))


def test_async_client_reads_the_slab_too(gpu_server, layout):
    server, gpu, slab = gpu_server
    tokens, kv = make_tokens(32), make_kv(layout, 32)

    async def run() -> None:
        async with AsyncClient(server.address, "m", layout) as c:
            c._gpu = _host_gpu_path()
            await c.put(tokens, kv)
            assert torch.equal(await c.get(tokens, device="cpu"), torch.from_numpy(kv))
            assert c._gpu.is_open(0)

    asyncio.run(run())
    assert slab.num_uploads == 2 and gpu.num_leases() == 0


def test_corrupt_slab_bytes_fall_back_to_the_arena(gpu_server, layout):
    server, gpu, slab = gpu_server
    tokens, kv = make_tokens(32), make_kv(layout, 32)
    with Client(server.address, "m", layout) as c:
        c._gpu = _host_gpu_path()
        c.put(tokens, kv)
        c.get(tokens, device="cpu")  # places both chunks in HBM
        _, [extent, _] = gpu.lease(gpu.keys())
        slab.corrupt(extent.offset + extent.length - 7)  # a payload byte of one chunk
        assert torch.equal(c.get(tokens, device="cpu"), torch.from_numpy(kv))
        assert not c._gpu.is_refused(0)  # a bad read, not a refusal: tried again next time
        assert not c._gpu.is_open(0)  # the failed read let go of the slab


def test_gpu_lease_pins_until_released_or_expired(gpu_server, layout):
    server, gpu, _ = gpu_server
    tokens = make_tokens(96)  # six chunks: the slab's whole room
    with Client(server.address, "m", layout) as c:
        c.put(tokens, make_kv(layout, 96))
        resp = _lease(server.address, "m", layout, tokens)
        assert len(resp.extents) == resp.num_chunks_stored == 6 and resp.lease_id
        assert resp.ttl_ms == 30_000 and len(resp.slab_nonce) == 16
        other = make_tokens(16, seed=9)
        c.put(other, make_kv(layout, 16, seed=9))
        assert _lease(server.address, "m", layout, other).lease_id == 0  # no room: all pinned
        c._release(0, resp.lease_id)
        assert gpu.num_leases() == 0
        short = _lease(server.address, "m", layout, other, ttl_ms=200)
        assert short.ttl_ms == 200 and gpu.num_leases() == 1
        time.sleep(0.3)
        assert gpu.num_leases() == 0


def test_killed_client_gpu_lease_pins_nothing_after_ttl(gpu_server, layout):
    server, gpu, _ = gpu_server
    tokens = make_tokens(32)
    with Client(server.address, "m", layout) as c:
        c.put(tokens, make_kv(layout, 32))
    script = (
        "import time\n"
        "from tests.conftest import SMALL_LAYOUT, make_tokens\n"
        "from tests.server.test_gpu_lease import _lease\n"
        f"resp = _lease({server.address!r}, 'm', SMALL_LAYOUT, make_tokens(32), ttl_ms=1000)\n"
        "print(len(resp.extents), flush=True)\n"
        "time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            cwd=ROOT)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "2"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert gpu.num_leases() == 1  # the dead client's lease still pins
    time.sleep(1.2)
    assert gpu.num_leases() == 0
