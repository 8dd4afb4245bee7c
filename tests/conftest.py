"""Shared fixtures: a real daemon on port 0 with its data in tmp_path, clients, KV data."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvstore.config import Config, load_config
from kvstore.layout import KVLayout

# Real redis-server fixtures (standalone, 3-master cluster) for the redis-marked tests.
pytest_plugins = ["tests.redis_servers"]

# Small SmolLM2-like shape (the real one is 30 x 3 x 64, 256-token chunks) for speed.
SMALL_LAYOUT = KVLayout(num_layers=4, num_kv_heads=3, head_dim=64, dtype="float16",
                        chunk_tokens=16)
SMOLLM2_LAYOUT = KVLayout(num_layers=30, num_kv_heads=3, head_dim=64, dtype="float16",
                          chunk_tokens=256)


def make_config(data_dir: Path, **overrides: Any) -> Config:
    """A daemon config on a free loopback port with its disk tier under ``data_dir``."""
    values: dict[str, Any] = {
        "server.listen": "127.0.0.1:0",
        "server.drain_timeout_s": 2.0,
        "server.io_threads": 4,
        "tiers.disk.path": str(data_dir),
        "tiers.disk.fsync": False,
        "tiers.cpu.capacity_bytes": 64 << 20,
        "engine.flush_interval_s": 0.2,
    }
    values.update(overrides)
    return load_config(None, values)


def make_kv(layout: KVLayout, num_tokens: int, seed: int = 0) -> np.ndarray:
    """Random KV ``[layers, 2, heads, num_tokens, dim]`` in layout's storage dtype.

    bfloat16 comes back as its uint16 bit pattern (finite values only).
    """
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(layout.shape(num_tokens), dtype=np.float32)
    if layout.dtype == "bfloat16":
        return (values.view(np.uint32) >> 16).astype(np.uint16)
    return values.astype(layout.dtype)


def make_tokens(num_tokens: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed + 1000).integers(0, 50_000, num_tokens, dtype=np.int32)


@pytest.fixture
def layout() -> KVLayout:
    return SMALL_LAYOUT


@pytest.fixture
def server_config(tmp_path: Path) -> Config:
    return make_config(tmp_path / "data")


@pytest.fixture
def server(server_config: Config) -> Iterator[Any]:
    from kvstore.server.app import ServerThread

    with ServerThread(server_config) as running:
        yield running


@pytest.fixture
def client(server: Any, layout: KVLayout) -> Iterator[Callable[..., Any]]:
    """Factory: ``client(namespace="m", layout=..., **kwargs)`` -> a Client of ``server``."""
    from kvstore.client import Client

    opened: list[Any] = []

    def factory(namespace: str = "model@rev", layout: KVLayout = layout, *,
                address: Any = None, **kwargs: Any) -> Client:
        kwargs.setdefault("timeout_s", 20.0)
        c = Client(address or server.address, namespace, layout, **kwargs)
        opened.append(c)
        return c

    yield factory
    for c in opened:
        c.close()
