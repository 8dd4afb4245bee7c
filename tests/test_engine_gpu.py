"""Engine with a GPU tier (host-memory slab): placement, promotion, demotion, deletes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from kvstore.codec import encode
from kvstore.config import (
    Config,
    CpuTierConfig,
    DiskTierConfig,
    EngineConfig,
    GpuTierConfig,
    load_config,
)
from kvstore.engine import Engine
from kvstore.tiers.base import Tier
from kvstore.tiers.cpu import CpuTier
from kvstore.tiers.disk import DiskTier
from kvstore.tiers.gpu import GpuTier
from kvstore.tiers.gpu_cuda import cuda_available
from tests.fakes import TINY_LAYOUT, HostSlab, make_key, make_object

OBJ_BYTES = len(make_object(seed=0))
SLOT_BYTES = -(-OBJ_BYTES // 64) * 64
NEVER_S = 3600.0

GpuEngineFactory = Callable[..., tuple[Engine, GpuTier, list[Tier]]]


@pytest.fixture
def make_engine(tmp_path: Path) -> Iterator[GpuEngineFactory]:
    engines: list[Engine] = []

    def factory(*, gpu_objects: int = 4, dram_objects: int = 8, hits: int = 2,
                disk: bool = True) -> tuple[Engine, GpuTier, list[Tier]]:
        slab = HostSlab(gpu_objects * SLOT_BYTES, str(tmp_path))
        gpu = GpuTier(GpuTierConfig(capacity_bytes=slab.nbytes, promote_after_hits=hits), slab)
        tiers: list[Tier] = [CpuTier(CpuTierConfig(capacity_bytes=dram_objects * OBJ_BYTES,
                                                   shm_dir=str(tmp_path)))]
        if disk:
            tiers.append(DiskTier(DiskTierConfig(path=str(tmp_path / "disk"), fsync=False,
                                                 capacity_bytes=64 * OBJ_BYTES, io="posix")))
        engine = Engine(EngineConfig(flush_interval_s=NEVER_S), tiers, gpu=gpu)
        engines.append(engine)
        return engine, gpu, tiers

    yield factory
    for engine in engines:
        engine.close()


def _in(tier: Tier, i: int) -> bool:
    return tier.contains_many([make_key(i)])[0]


def test_chunk_is_promoted_after_the_configured_number_of_gets(make_engine) -> None:
    engine, gpu, _ = make_engine(hits=2)
    engine.put(make_key(0), make_object(seed=0))
    assert engine.get(make_key(0)) == make_object(seed=0)
    assert not _in(gpu, 0)
    assert engine.get(make_key(0)) == make_object(seed=0)
    assert _in(gpu, 0)
    assert engine.lookup([make_key(0)])[1] == {"gpu": 1, "cpu": 1, "disk": 0}
    assert [s.name for s in engine.stats()] == ["gpu", "cpu", "disk"]


def test_put_places_in_gpu_when_promote_after_hits_is_zero(make_engine) -> None:
    engine, gpu, _ = make_engine(hits=0)
    engine.put(make_key(0), make_object(seed=0))
    assert _in(gpu, 0)


def test_compressed_chunks_stay_out_of_the_gpu_tier(make_engine) -> None:
    engine, gpu, _ = make_engine(hits=0)
    kv = np.random.default_rng(0).standard_normal(TINY_LAYOUT.chunk_shape).astype(np.float16)
    engine.put(make_key(0), encode(kv, TINY_LAYOUT, "balanced"))
    engine.get(make_key(0))
    assert not _in(gpu, 0) and engine.contains(make_key(0))


def test_gpu_eviction_demotes_to_dram_when_no_lower_tier_holds_it(make_engine) -> None:
    engine, gpu, (cpu,) = make_engine(gpu_objects=1, dram_objects=1, hits=0, disk=False)
    engine.put(make_key(0), make_object(seed=0))  # DRAM and HBM
    engine.put(make_key(1), make_object(seed=1))  # DRAM evicts 0 (no disk); HBM evicts 0 too
    # HBM's victim 0 was held nowhere else, so it went back to DRAM (evicting 1 there,
    # which HBM still holds): nothing was lost.
    assert _in(cpu, 0) and not _in(gpu, 0)
    assert _in(gpu, 1) and not _in(cpu, 1)
    assert engine.get(make_key(0)) == make_object(seed=0)
    assert engine.get(make_key(1)) == make_object(seed=1)


def test_gpu_holds_the_only_copy_until_it_evicts_it(make_engine) -> None:
    engine, gpu, (cpu,) = make_engine(gpu_objects=2, dram_objects=1, hits=0, disk=False)
    engine.put(make_key(0), make_object(seed=0))
    engine.put(make_key(1), make_object(seed=1))  # DRAM drops 0; HBM keeps 0 and 1
    assert not _in(cpu, 0) and _in(gpu, 0)
    assert engine.get(make_key(0)) == make_object(seed=0)  # served from HBM
    assert gpu.stats().hits == 1


def test_delete_removes_the_gpu_copy(make_engine) -> None:
    engine, gpu, _ = make_engine(hits=0)
    engine.put(make_key(0), make_object(seed=0))
    assert engine.delete(make_key(0))
    assert not _in(gpu, 0) and not engine.contains(make_key(0))


def test_promote_to_gpu_reads_the_disk_straight_into_the_slab(make_engine) -> None:
    engine, gpu, (cpu, disk) = make_engine(hits=100)
    disk.put(make_key(0), make_object(seed=0))  # only on disk
    assert engine.promote_to_gpu(make_key(0))
    assert _in(gpu, 0) and not _in(cpu, 0)  # DRAM was skipped
    assert gpu.get(make_key(0)) == make_object(seed=0)
    assert disk.stats().hits == 1


def test_promote_to_gpu_refuses_a_corrupt_disk_object(make_engine, tmp_path: Path) -> None:
    engine, gpu, (_, disk) = make_engine(hits=100)
    disk.put(make_key(0), make_object(seed=0))
    path = Path(disk.path_of(make_key(0)))
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    assert not engine.promote_to_gpu(make_key(0))
    assert not _in(gpu, 0) and not _in(disk, 0)  # dropped as corrupt, never placed
    assert disk.stats().corrupt == 1


def test_promote_to_gpu_without_a_gpu_tier_is_false(tmp_path: Path) -> None:
    engine = Engine(EngineConfig(), [CpuTier(CpuTierConfig(capacity_bytes=1 << 20,
                                                           shm_dir=str(tmp_path)))])
    engine.put(make_key(0), make_object(seed=0))
    assert engine.gpu is None and not engine.promote_to_gpu(make_key(0))
    engine.close()


def test_from_config_runs_without_gpu_tier_when_cuda_is_missing(tmp_path: Path) -> None:
    config: Config = load_config(None, {"tiers.gpu.capacity_bytes": "1MiB",
                                        "tiers.disk.enabled": False,
                                        "tiers.cpu.shm_dir": str(tmp_path)})
    assert config.tiers.gpu.capacity_bytes == 1 << 20
    engine = Engine.from_config(config)  # without CUDA: logged, and no GPU tier
    has_cuda = cuda_available()
    assert (engine.gpu is not None) == has_cuda
    assert [s.name for s in engine.stats()] == ["gpu", "cpu"] if has_cuda else ["cpu"]
    engine.close()
