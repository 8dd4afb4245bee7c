"""GPU parts on a CUDA machine only (marker ``gpu``): the CUDA slab, CUDA IPC from another
process, the client's device get, registered arena H2D copies and kvikio reads.

Without CUDA every test here is skipped with its reason; the same logic runs on the
CPU through a host-memory slab (tests/tiers/test_gpu_tier.py, tests/test_engine_gpu.py,
tests/server/test_gpu_lease.py).
"""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest

from kvstore.tiers.gpu_cuda import cuda_available

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not cuda_available(), reason="needs torch, cupy and a CUDA "
                                 "device")]


ROOT = Path(__file__).resolve().parent.parent.parent


def _ipc_child(queue, resp_bytes, offset, length, expected):  # runs in a spawned process
    from kvstore._proto import kvstore_pb2 as pb
    from kvstore.client._gpu import open_cuda_slab

    slab = open_cuda_slab(pb.LeaseGpuChunksResponse.FromString(resp_bytes))
    queue.put(slab.tensor[offset : offset + length].cpu().numpy().tobytes() == expected)
    slab.close()


def _gpu_tier(capacity: int):
    from kvstore.config import GpuTierConfig
    from kvstore.tiers.gpu_cuda import open_gpu_tier

    tier = open_gpu_tier(GpuTierConfig(capacity_bytes=capacity))
    assert tier is not None
    return tier


def test_device_checksum_on_gpu_equals_cpu():
    import torch

    from kvstore.device_checksum import device_checksum

    data = torch.randint(0, 256, (6 << 20 | 3,), dtype=torch.uint8)
    assert device_checksum(data.cuda(), 5) == device_checksum(data, 5)


def test_cuda_slab_round_trip_and_checksum():
    from kvstore.device_checksum import checksum_reference
    from tests.fakes import make_key, make_object

    tier = _gpu_tier(1 << 20)
    try:
        objs = [make_object(seed=i) for i in range(3)]
        for i, obj in enumerate(objs):
            assert tier.put(make_key(i), obj)
        assert [tier.get(make_key(i)) for i in range(3)] == objs
        _, extents = tier.lease([make_key(i) for i in range(3)])
        assert [e.checksum for e in extents] == [checksum_reference(o) for o in objs]
        assert tier.pci_bus_id and len(tier.ipc_handle()) == 64
    finally:
        tier.close()


def test_cuda_ipc_open_from_another_process_reads_the_slab():
    import torch.multiprocessing as mp

    from kvstore._proto import kvstore_pb2 as pb
    from kvstore.server.gpu import slab_info
    from tests.fakes import make_key, make_object

    tier = _gpu_tier(1 << 20)
    try:
        obj = make_object(seed=7)
        tier.put(make_key(7), obj)
        _, [extent] = tier.lease([make_key(7)])
        resp = pb.LeaseGpuChunksResponse(**slab_info(tier)).SerializeToString()
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        proc = ctx.Process(target=_ipc_child,
                           args=(queue, resp, extent.offset, extent.length, obj))
        proc.start()
        assert queue.get(timeout=120) is True
        proc.join(timeout=60)
    finally:
        tier.close()


def test_client_device_get_copies_from_the_gpu_tier(tmp_path: Path):
    import subprocess
    import sys

    import grpc
    import torch

    from kvstore.client import Client
    from tests.conftest import SMALL_LAYOUT, make_kv, make_tokens

    # The daemon runs in its own process: CUDA cannot open an IPC handle in the
    # process that exported it.
    config = tmp_path / "gpu.toml"
    config.write_text(f'[tiers.gpu]\ncapacity_bytes = "16MiB"\n[tiers.cpu]\n'
                      f'shm_dir = "{tmp_path}"\n[tiers.disk]\npath = "{tmp_path / "disk"}"\n')
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{sock.getsockname()[1]}"
    daemon = subprocess.Popen([sys.executable, "-m", "kvstore", "serve", "--config", str(config),
                               "--listen", address], cwd=ROOT)
    try:
        grpc.channel_ready_future(grpc.insecure_channel(address)).result(timeout=120)
        tokens, kv = make_tokens(64), make_kv(SMALL_LAYOUT, 64)
        with Client(address, "m", SMALL_LAYOUT, timeout_s=60) as c:
            c.put(tokens, kv)
            got = c.get(tokens, device="cuda")
            assert got.is_cuda and torch.equal(got.cpu(), torch.from_numpy(kv))
            assert c._gpu.is_open(0)  # through the GPU tier, not a fallback
            part = c.get(tokens, layers=[0, 3], device="cuda")
            assert torch.equal(part.cpu(), torch.from_numpy(kv[[0, 3]]))
            gpu = c.stats()["tiers"][0]
            assert gpu["name"] == "gpu" and gpu["num_objects"] == 4
            assert gpu["info"]["leases"] == "0"
    finally:
        daemon.terminate()
        daemon.wait(timeout=60)


def test_registered_arena_h2d_copy_is_bit_exact(tmp_path: Path):
    import torch

    from kvstore.arena import Arena
    from kvstore.arena_file import ArenaReader
    from kvstore.keys import ChunkKey

    arena = Arena(1 << 20, directory=str(tmp_path))
    try:
        payload = np.random.default_rng(0).integers(0, 255, 65536, dtype=np.uint8).tobytes()
        arena.put(ChunkKey(b"\x01" * 32), payload)
        lease, [extent] = arena.lease([ChunkKey(b"\x01" * 32)])
        reader = ArenaReader(arena.path)
        host = torch.frombuffer(reader.view(extent), dtype=torch.uint8)
        cudart = torch.cuda.cudart()
        # Registering the (read-only) mapping lets the GPU DMA straight from it.
        assert cudart.cudaHostRegister(host.data_ptr(), host.numel(), 0) == 0
        try:
            device = host.to("cuda", non_blocking=True)
            torch.cuda.synchronize()
            assert device.cpu().numpy().tobytes() == payload
        finally:
            cudart.cudaHostUnregister(host.data_ptr())
        arena.release(lease)
    finally:
        arena.close()


def test_kvikio_disk_reads_match_posix(tmp_path: Path):
    pytest.importorskip("kvikio")
    from kvstore.config import DiskTierConfig
    from kvstore.tiers.disk import DiskTier
    from kvstore.tiers.disk_io import PosixIO, select_io
    from tests.fakes import make_key, make_object

    tier = DiskTier(DiskTierConfig(path=str(tmp_path), fsync=False, io="kvikio"))
    assert tier.stats().info["io"].startswith("kvikio")
    obj = make_object(seed=3)
    tier.put(make_key(3), obj)
    assert tier.get(make_key(3)) == obj
    path = tier.path_of(make_key(3))
    assert select_io("kvikio").read(path)[0] == PosixIO().read(path)[0]
    buf = bytearray(len(obj))
    assert tier.read_into(make_key(3), memoryview(buf)) and bytes(buf) == obj


def test_kvikio_reads_straight_into_device_memory(tmp_path: Path):
    pytest.importorskip("kvikio")
    import torch

    from kvstore.tiers.disk_io import device_read_mode, read_to_device, select_io

    path = tmp_path / "blob"
    data = np.random.default_rng(1).integers(0, 256, 3 << 20, dtype=np.uint8)
    path.write_bytes(data.tobytes())
    io = select_io("kvikio")
    assert device_read_mode(io) == "kvikio-direct"
    out = torch.empty(data.size, dtype=torch.uint8, device="cuda")
    assert read_to_device(io, str(path), out, memoryview(bytearray(0))) == data.size
    assert torch.equal(out.cpu(), torch.from_numpy(data))
