"""The disk tier's I/O backend: chosen at start-up, shown in stats; POSIX without CUDA."""

from __future__ import annotations

import pytest

from kvstore.config import DiskTierConfig
from kvstore.errors import InvalidArgument
from kvstore.tiers.disk import DiskTier
from kvstore.tiers.disk_io import PosixIO, _kvikio_usable, select_io
from tests.fakes import make_key, make_object


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
