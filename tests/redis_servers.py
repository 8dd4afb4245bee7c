"""Real redis-server processes for tests: standalone servers and a 3-master cluster.

The processes themselves live in ``bench/_procs.py`` (the soak benchmark uses them
too, and benchmarks never import the tests); this module adds the pytest fixtures.
Every process runs on a free loopback port in its own tmp dir, with persistence off,
and is killed by PID at teardown even when the test fails. Register the fixtures
with ``pytest_plugins = ["tests.redis_servers"]`` in a conftest, or import them.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench._procs import (  # noqa: F401 - re-exported for the tests
    NUM_SLOTS,
    REDIS_SERVER,
    RedisClusterProcs,
    RedisFactory,
    RedisProcess,
    free_port,
    start_cluster,
)


@pytest.fixture
def redis_factory() -> Iterator[RedisFactory]:
    """Start any number of redis-server processes; all are killed by PID at teardown."""
    root = Path(tempfile.mkdtemp(prefix="kvstore-redis-"))
    factory = RedisFactory(root)
    try:
        yield factory
    finally:
        factory.kill_all()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def redis_server(redis_factory: RedisFactory) -> RedisProcess:
    """One standalone redis-server on a free loopback port."""
    return redis_factory.server()


@pytest.fixture
def redis_cluster(redis_factory: RedisFactory) -> RedisClusterProcs:
    """A 3-master cluster without replicas (node timeout 1 s)."""
    return start_cluster(redis_factory)


@pytest.fixture
def redis_cluster_with_replicas(redis_factory: RedisFactory) -> RedisClusterProcs:
    """A 3-master cluster, one replica per master (node timeout 1 s)."""
    return start_cluster(redis_factory, with_replicas=True)
