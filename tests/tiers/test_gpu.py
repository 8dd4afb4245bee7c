"""GPU parts, run on a CUDA machine only (marker ``gpu``): HBM tier, CUDA IPC, registered
arena H2D copies and kvikio disk reads. Without CUDA every test here is skipped."""

from __future__ import annotations

import numpy as np
import pytest

from kvstore.tiers.gpu import cuda_available

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not cuda_available(), reason="needs a CUDA device")]


def _ipc_child(queue, chunk, expected_sum):  # runs in a spawned process
    from kvstore.tiers.gpu import import_ipc

    out = import_ipc(chunk)
    queue.put(float(out.float().sum().item()) == expected_sum)


def test_cuda_ipc_round_trip_copies_device_to_device():
    import torch
    import torch.multiprocessing as mp

    from kvstore.tiers.gpu import GpuTier, GpuTierConfig
    from tests.fakes import make_key

    chunk = torch.arange(4 * 2 * 1 * 16 * 8, dtype=torch.float32).view(4, 2, 1, 16, 8)
    tier = GpuTier(GpuTierConfig(capacity_bytes=1 << 20))
    tier.put(make_key(0), chunk).synchronize()
    exported = tier.export(make_key(0))
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_ipc_child, args=(queue, exported, float(chunk.sum())))
    proc.start()
    assert queue.get(timeout=120) is True
    proc.join(timeout=60)


def test_registered_arena_h2d_copy_is_bit_exact(tmp_path):
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


def test_kvikio_disk_reads_match_posix(tmp_path):
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
