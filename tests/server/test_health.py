"""grpc.health.v1: NOT_SERVING until the arena is prefaulted and once a drain begins."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvstore.client import Client
from kvstore.engine import Engine
from kvstore.server.app import ServerThread
from tests.conftest import make_config, make_kv, make_tokens

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICES = ("", "kvstore.v1.KVStore")


def _status(address: str, service: str = "") -> int:
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        return health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def _wait_for(address: str, want: int, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (got := _status(address)) != want:
        assert time.monotonic() < deadline, f"health stayed {got}, wanted {want}"
        time.sleep(0.05)


def test_health_is_not_serving_until_the_arena_is_prefaulted(tmp_path, layout):
    config = make_config(tmp_path / "d")
    engine = Engine.from_config(config)
    try:
        assert engine.dram.prefaulted.wait(30)
        engine.dram.prefaulted.clear()  # as if the prefault thread were still running
        with ServerThread(config, engine) as srv:
            time.sleep(0.3)
            assert [_status(srv.address, s) for s in SERVICES] == [NOT_SERVING] * 2
            with Client(srv.address, "m", layout) as c:  # calls are answered meanwhile
                assert c.put(make_tokens(16), make_kv(layout, 16)) == 16
            engine.dram.prefaulted.set()
            _wait_for(srv.address, SERVING)
            assert [_status(srv.address, s) for s in SERVICES] == [SERVING] * 2
    finally:
        engine.close()


def test_health_turns_serving_on_its_own_after_start(server):
    server.wait_ready()
    assert [_status(server.address, s) for s in SERVICES] == [SERVING] * 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_sigterm_reports_not_serving_while_draining(tmp_path: Path, layout):
    address = f"127.0.0.1:{_free_port()}"
    config = tmp_path / "kvstore.toml"
    config.write_text(f'[server]\nlisten = "{address}"\ndrain_notice_s = 8.0\n'
                      f'[tiers.cpu]\ncapacity_bytes = "64MiB"\n'
                      f'[tiers.disk]\npath = "{tmp_path / "data"}"\n')
    with open(tmp_path / "daemon.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "kvstore", "serve", "--config",
                                 str(config)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                _wait_for(address, SERVING, timeout_s=60)
                break
            except grpc.RpcError:
                assert proc.poll() is None and time.monotonic() < deadline, \
                    (tmp_path / "daemon.log").read_text()
                time.sleep(0.1)
        tokens, kv = make_tokens(16), make_kv(layout, 16)
        with Client(address, "m", layout, transport="stream", timeout_s=20) as c:
            assert c.put(tokens, kv) == 16
            os.kill(proc.pid, signal.SIGTERM)
            _wait_for(address, NOT_SERVING, timeout_s=5)
            # Still answering during the notice, so in-flight traffic can move away.
            assert np.array_equal(c.get(tokens, as_numpy=True), kv)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
