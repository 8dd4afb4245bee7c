"""KVStoreConnector against vLLM's real connector base, request and scheduler-output classes.

Scheduler-role and worker-role connectors run in separate processes and talk only
through the pickled SchedulerOutput (see tests/integrations/_vllm_engine.py).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import numpy as np
import pytest

try:  # the engine's own classes; without them there is nothing to test against
    from vllm.distributed.kv_transfer.kv_connector.v1.base import (  # noqa: F401
        KVConnectorBase_V1,
        KVConnectorRole,
    )
    from vllm.v1.core.sched.output import SchedulerOutput  # noqa: F401
    from vllm.v1.request import Request  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the [engines] extra
    pytest.skip(f"vllm is not importable ({exc}); pip install -e '.[engines]' and "
                "vllm --no-deps (README)", allow_module_level=True)

from kvstore.client import Client
from kvstore.integrations.vllm import KVStoreConnector
from kvstore.keys import Namespace, prefix_keys
from tests.integrations._vllm_engine import (
    BLOCK_SIZE,
    Engine,
    expected_kv,
    make_connector,
)
from tests.test_daemon_process import Daemon

CHUNK = 32
NAMESPACE = "tiny-llama@main"


def _extra(address: str, **more) -> dict:
    return {"address": address, "namespace": NAMESPACE, "chunk_tokens": CHUNK,
            "timeout_s": 5.0, **more}


def _prompt(num_tokens: int, seed: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, 30_000, num_tokens)]


def _stored_client(engine: Engine, address: str, tp_rank: int = 0) -> Client:
    c = engine.connector
    return Client(address, c.namespace, c.layout, tp_rank=tp_rank, timeout_s=10)


def _wait_stored(client: Client, prompt: list[int], num_tokens: int) -> None:
    deadline = time.monotonic() + 20
    while client.lookup(prompt) < num_tokens:  # saves are asynchronous
        assert time.monotonic() < deadline, "the save never reached the daemon"
        time.sleep(0.02)


def test_connector_is_the_real_vllm_base_class(server):
    scheduler = make_connector(_extra(server.address), "SCHEDULER")
    try:
        assert isinstance(scheduler, KVStoreConnector)
        assert isinstance(scheduler, KVConnectorBase_V1)
        assert scheduler.role == KVConnectorRole.SCHEDULER
        assert scheduler.namespace == f"{NAMESPACE}/tp1"
    finally:
        scheduler.shutdown()


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "tokens-outside-heads"])
def test_second_request_loads_exactly_the_bytes_the_first_saved(server, strided):
    first = _prompt(100, seed=1)  # 3 full chunks (96 tokens) are saved
    second = first[:96] + _prompt(14, seed=2)
    with Engine(_extra(server.address), strided=strided) as engine:
        got = engine.prefill("a", first)
        assert (got.num_external, got.load_errors) == (0, [])
        saved = engine.read("a", 0, 96)
        np.testing.assert_array_equal(saved, expected_kv("a", 96))
        with _stored_client(engine, server.address) as client:
            _wait_stored(client, first, 96)
        got = engine.prefill("b", second)
        assert got.num_external == 96 and got.load_errors == []
        assert set(got.block_ids).isdisjoint(engine.free_blocks)
        loaded = engine.read("b", 0, 96)
        assert loaded.tobytes() == saved.tobytes()  # bit-exact, into b's own blocks
        own = engine.read("b", 96, 110)
        np.testing.assert_array_equal(own, expected_kv("b", 110)[:, :, :, 96:])


def test_partial_hit_loads_only_the_stored_chunks(server):
    first = _prompt(100, seed=3)
    partial = first[:64] + _prompt(60, seed=4)  # shares 2 chunks, then differs
    with Engine(_extra(server.address)) as engine:
        engine.prefill("a", first)
        with _stored_client(engine, server.address) as client:
            _wait_stored(client, first, 96)
            assert client.lookup(partial) == 64
        got = engine.prefill("c", partial)
        assert got.num_external == 64 and got.load_errors == []
        np.testing.assert_array_equal(engine.read("c", 0, 64), expected_kv("a", 64))
        # Past the hit, the request's blocks hold what its own forward computed.
        np.testing.assert_array_equal(engine.read("c", 64, 124),
                                      expected_kv("c", 124)[:, :, :, 64:])


def test_hit_is_capped_below_the_last_prompt_token(server):
    prompt = _prompt(96, seed=5)  # exactly 3 chunks: the last token must still run
    with Engine(_extra(server.address)) as engine:
        engine.prefill("a", prompt + [7])
        with _stored_client(engine, server.address) as client:
            _wait_stored(client, prompt, 96)
        got = engine.prefill("b", prompt)
        assert got.num_external == 96 - BLOCK_SIZE


@pytest.mark.slow
@pytest.mark.parametrize("how", ["killed", "frozen"])
def test_daemon_lost_mid_load_reports_block_errors_and_request_recomputes(tmp_path, how):
    daemon = Daemon(tmp_path, tmp_path / "data")
    prompt = _prompt(100, seed=6)
    try:
        with Engine(_extra(daemon.address, timeout_s=1.5, transport="stream")) as engine:
            engine.prefill("a", prompt)
            with _stored_client(engine, daemon.address) as client:
                _wait_stored(client, prompt, 96)
            # The scheduler's lookup sees the hit; the daemon goes before the worker loads.
            request_tokens = prompt[:96] + _prompt(20, seed=7)
            original_prefill_step = engine.step

            def step_after_losing_daemon(so):
                daemon.proc.send_signal(signal.SIGKILL if how == "killed" else signal.SIGSTOP)
                return original_prefill_step(so)

            engine.step = step_after_losing_daemon
            got = engine.prefill("b", request_tokens)
            engine.step = original_prefill_step
            hit_blocks = got.block_ids[:96 // BLOCK_SIZE]
            assert got.num_external == 96
            assert got.load_errors == sorted(hit_blocks)  # exactly the blocks to be loaded
            assert got.num_steps == 2  # rewound to block 0 and recomputed
            np.testing.assert_array_equal(engine.read("b", 0, 116), expected_kv("b", 116))
    finally:
        daemon.proc.send_signal(signal.SIGCONT)
        daemon.stop(signal.SIGKILL)


@pytest.mark.slow
def test_failure_policy_fail_ends_the_request_instead(tmp_path):
    daemon = Daemon(tmp_path, tmp_path / "data")
    prompt = _prompt(100, seed=8)
    try:
        with Engine(_extra(daemon.address, timeout_s=1.5), policy="fail") as engine:
            engine.prefill("a", prompt)
            with _stored_client(engine, daemon.address) as client:
                _wait_stored(client, prompt, 96)
            daemon.stop(signal.SIGKILL)
            got = engine.prefill("b", prompt[:96] + [1, 2, 3])
            assert got.load_errors and got.is_failed and got.num_steps == 1
            # The worker survives: a later miss runs normally.
            assert engine.prefill("c", _prompt(40, seed=9)).load_errors == []
    finally:
        daemon.stop(signal.SIGKILL)


def test_two_connector_processes_share_one_daemon(server):
    prompt = _prompt(130, seed=10)  # 4 chunks
    with Engine(_extra(server.address), hash_seed="1") as one, \
            Engine(_extra(server.address), hash_seed="2", strided=True) as two:
        one.prefill("a", prompt)
        with _stored_client(one, server.address) as client:
            _wait_stored(client, prompt, 128)
        got = two.prefill("b", prompt[:128] + [5, 6, 7])
        assert got.num_external == 128 and got.load_errors == []
        assert two.read("b", 0, 128).tobytes() == one.read("a", 0, 128).tobytes()


def test_keys_agree_across_processes_with_different_hash_seeds():
    code = ("from kvstore.keys import Namespace, prefix_keys; from kvstore.layout import KVLayout;"
            "ns = Namespace('m@main/tp2', KVLayout(4, 2, 16, chunk_tokens=32), tp_rank=1);"
            "print(''.join(k.hex() for k in prefix_keys(ns, list(range(100)))))")
    outputs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env={"PYTHONHASHSEED": seed, "PATH": ""}, check=True).stdout
               for seed in ("1", "2", "random")}
    assert len(outputs) == 1 and len(outputs.pop()) == 3 * 64


def test_tensor_parallel_ranks_cannot_read_each_others_chunks(server):
    prompt = _prompt(70, seed=11)
    with Engine(_extra(server.address)) as engine:
        engine.prefill("a", prompt)
        layout = engine.connector.layout
        with _stored_client(engine, server.address) as rank0, \
                _stored_client(engine, server.address, tp_rank=1) as rank1:
            _wait_stored(rank0, prompt, 64)
            assert rank1.lookup(prompt) == 0 and rank1.get(prompt) is None
        keys = {r: prefix_keys(Namespace(engine.connector.namespace, layout, tp_rank=r), prompt)
                for r in (0, 1)}
        assert not set(keys[0]) & set(keys[1])


@pytest.mark.slow
def test_lookup_answers_none_while_the_daemon_is_slow(tmp_path):
    daemon = Daemon(tmp_path, tmp_path / "data")
    from vllm.sampling_params import SamplingParams

    scheduler = make_connector(_extra(daemon.address, lookup_wait_ms=1.0), "SCHEDULER")
    try:
        request = Request("r", _prompt(80, seed=12), SamplingParams(max_tokens=1), None)
        daemon.proc.send_signal(signal.SIGSTOP)
        started = time.monotonic()
        assert scheduler.get_num_new_matched_tokens(request, 0) == (None, False)
        assert time.monotonic() - started < 0.5  # the scheduler was not blocked
        daemon.proc.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + 10
        while (answer := scheduler.get_num_new_matched_tokens(request, 0))[0] is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert answer == (0, False)  # nothing stored: a miss
    finally:
        scheduler.shutdown()
        daemon.proc.send_signal(signal.SIGCONT)
        daemon.stop(signal.SIGKILL)
