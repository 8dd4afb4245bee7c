"""The disk tier's I/O backend: chosen at start-up, shown in stats; POSIX without CUDA."""

from __future__ import annotations

import pytest

from kvstore.config import DiskTierConfig
from kvstore.errors import InvalidArgument
from kvstore.tiers.disk import DiskTier
from kvstore.tiers.disk_io import (
    PosixIO,
    _kvikio_usable,
    device_read_mode,
    read_to_device,
    select_io,
)
from tests.fakes import flip_bit, make_key, make_object


def test_io_is_posix_when_forced(tmp_path):
    tier = DiskTier(DiskTierConfig(path=str(tmp_path), fsync=False, io="posix"))
    assert tier.stats().info["io"] == "posix"
    tier.put(make_key(0), make_object(seed=0))
    assert tier.get(make_key(0)) == make_object(seed=0)


def test_auto_io_falls_back_to_posix_when_kvikio_unusable(tmp_path):
    if _kvikio_usable():
        pytest.skip("kvikio and a CUDA device are present: auto picks kvikio")
    assert isinstance(select_io("auto"), PosixIO)
    assert DiskTier(DiskTierConfig(path=str(tmp_path), io="auto")).stats().info["io"] == "posix"


def test_forced_kvikio_is_refused_when_unusable():
    if _kvikio_usable():
        pytest.skip("kvikio is usable here")
    with pytest.raises(InvalidArgument, match="kvikio"):
        select_io("kvikio")


def test_unknown_io_mode_is_refused():
    with pytest.raises(InvalidArgument, match="tiers.disk.io"):
        DiskTierConfig(io="aio")


def test_posix_read_into_fills_the_callers_buffer(tmp_path):
    path = tmp_path / "obj"
    path.write_bytes(make_object(seed=1))
    buf = bytearray(len(make_object(seed=1)) + 10)
    num_read, inode = PosixIO().read_into(str(path), memoryview(buf))
    assert num_read == len(make_object(seed=1)) and inode == path.stat().st_ino
    assert bytes(buf[:num_read]) == make_object(seed=1)


def test_device_reads_without_kvikio_stage_through_host_memory(tmp_path):
    import torch

    path = tmp_path / "obj"
    path.write_bytes(make_object(seed=2))
    io = PosixIO()
    assert device_read_mode(io) == "host-staged"
    out = torch.zeros(len(make_object(seed=2)), dtype=torch.uint8)  # stands in for HBM
    staging = memoryview(bytearray(len(make_object(seed=2))))
    assert read_to_device(io, str(path), out, staging) == len(make_object(seed=2))
    assert out.numpy().tobytes() == make_object(seed=2)


def test_disk_read_into_verifies_and_counts(tmp_path):
    tier = DiskTier(DiskTierConfig(path=str(tmp_path), fsync=False, io="posix"))
    obj = make_object(seed=3)
    tier.put(make_key(3), obj)
    assert tier.object_bytes(make_key(3)) == len(obj)
    buf = bytearray(len(obj))
    assert tier.read_into(make_key(3), memoryview(buf), want_raw=True)
    assert bytes(buf) == obj
    assert not tier.read_into(make_key(3), memoryview(bytearray(len(obj) - 1)))  # wrong size
    assert tier.object_bytes(make_key(3)) == len(obj)  # a size mismatch is no corruption
    path = tmp_path / tier.path_of(make_key(3))
    path.write_bytes(flip_bit(obj, -1))
    assert not tier.read_into(make_key(3), memoryview(bytearray(len(obj))))
    assert tier.object_bytes(make_key(3)) is None  # the corrupt file was dropped
    stats = tier.stats()
    assert (stats.hits, stats.misses, stats.corrupt) == (1, 2, 1)
