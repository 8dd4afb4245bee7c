"""One authenticated daemon on port 0 for the whole fuzz package, with allocations traced."""

from __future__ import annotations

import tracemalloc
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from tests.conftest import make_config

TOKEN = "fuzz-token"
METADATA = (("authorization", f"Bearer {TOKEN}"),)


@pytest.fixture(scope="package")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from kvstore.server.app import ServerThread

    config = make_config(tmp_path_factory.mktemp("fuzz-data"),
                         **{"server.tokens": {TOKEN: "tenant-a"}})
    with ServerThread(config) as server:
        yield server


@pytest.fixture(scope="package")
def channel(fuzz_server: Any) -> Iterator[grpc.Channel]:
    opts = [("grpc.max_receive_message_length", 80 << 20),
            ("grpc.max_send_message_length", 80 << 20)]
    with grpc.insecure_channel(fuzz_server.address, options=opts) as ch:
        yield ch


@pytest.fixture(scope="package", autouse=True)
def traced() -> Iterator[None]:
    """Trace Python allocations (numpy's included) so a test can bound one call's peak."""
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    yield
    if not was_tracing:
        tracemalloc.stop()
