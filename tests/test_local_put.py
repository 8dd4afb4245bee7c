"""The same-host put end to end: reserve arena space, write objects in place, commit."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from kvstore._proto import kvstore_pb2 as pb
from kvstore.client import AsyncClient, Client
from kvstore.client import _arena_put as arena_put
from kvstore.client import _protocol as proto
from kvstore.client._local import Extent
from kvstore.errors import InvalidArgument, NotFound
from kvstore.server.app import ServerThread
from tests.conftest import make_config, make_kv, make_tokens

ROOT = Path(__file__).resolve().parent.parent


def _reserve(c: Client, tokens, kv, *, ttl_ms: int = 0):
    """ReserveExtents for every chunk of ``tokens`` by hand: (stub, arena, plan, response)."""
    c.lookup(tokens)  # opens the channel
    stub = c._conns.stub(0)
    arena = c._local.mapped(0)
    if arena is None:
        from kvstore.client import _local as local

        arena = local.attach(stub.AttachArena(pb.AttachArenaRequest()))
        c._local.remember(0, arena)
    plan = proto.plan_put(c.layout, tokens, kv, position_free=False)
    size = arena_put.raw_object_bytes(c.layout, plan.tokens_per_chunk)
    resp = stub.ReserveExtents(pb.ReserveExtentsRequest(
        namespace=c._ns, tokens_le_i32=plan.tokens.tobytes(),
        object_bytes=[size] * plan.num_chunks, ttl_ms=ttl_ms, arena_nonce=arena.nonce))
    return stub, arena, plan, resp


def _write(arena, plan, resp, layout) -> None:
    for i, extent in enumerate(resp.extents):
        dst = arena.writable().view(Extent(extent.offset_bytes, extent.length_bytes))
        piece = plan.kv[:, :, :, i * plan.tokens_per_chunk:(i + 1) * plan.tokens_per_chunk]
        arena_put.write_raw_object(dst, piece, layout, 0)


def _reservations(server: ServerThread) -> tuple[str, str]:
    info = server.engine.dram.stats().info
    return info["reservations"], info["reserved_bytes"]


def test_same_host_put_sends_no_object_bytes_and_round_trips(client, layout, server):
    tokens, kv = make_tokens(64), make_kv(layout, 64)
    c = client(transport="arena")
    assert c.put(tokens, kv) == 64
    assert server.counters.received_bytes == 0  # nothing crossed the socket
    assert server.counters.requests.get("Put", 0) == 0
    assert server.counters.requests["CommitExtents"] == 1
    assert _reservations(server) == ("0", "0")
    assert np.array_equal(client(transport="stream").get(tokens, as_numpy=True), kv)
    # A second put of a longer sequence writes only the new chunks.
    longer, kv2 = np.concatenate([tokens, make_tokens(32, seed=4)]), make_kv(layout, 96)
    kv2[:, :, :, :64] = kv
    assert c.put(longer, kv2) == 96
    assert server.engine.dram.stats().num_objects == 6
    assert np.array_equal(c.get(longer, as_numpy=True), kv2)


def test_same_host_put_of_kvq_and_position_free_chunks(client, layout, server):
    tokens, kv = make_tokens(64), make_kv(layout, 64)
    c = client(transport="arena", codec="balanced")
    assert c.put(tokens, kv) == 64
    assert server.counters.received_bytes == 0
    streamed = client("model@rev", transport="stream", codec="balanced")
    other = make_tokens(64, seed=9)
    streamed.put(other, kv)
    # Same bits whichever path stored them (the same encoder ran).
    assert np.array_equal(c.get(tokens, as_numpy=True), streamed.get(other, as_numpy=True))
    received = server.counters.received_bytes  # the streamed put's
    rag, rag_kv = make_tokens(7, seed=3), make_kv(layout, 7, seed=3)
    raw = client(transport="arena")
    assert raw.put_chunk(rag, rag_kv) is True
    assert raw.put_chunk(rag, rag_kv) is False  # already stored
    assert np.array_equal(raw.get_chunk(rag, as_numpy=True), rag_kv)
    assert server.counters.received_bytes == received


def test_committed_object_is_indexed_where_the_client_wrote_it(client, layout, server):
    c = client(transport="arena")
    tokens, kv = make_tokens(32), make_kv(layout, 32)
    stub, arena, plan, resp = _reserve(c, tokens, kv)
    _write(arena, plan, resp, layout)
    done = stub.CommitExtents(pb.CommitExtentsRequest(reservation_id=resp.reservation_id))
    assert (done.num_chunks_stored, done.num_chunks_present) == (2, 0)
    with c.lease(tokens) as lease:  # no copy: the stored objects are the written bytes
        assert [(e.offset, e.length) for e in lease.extents] == [
            (e.offset_bytes, e.length_bytes) for e in resp.extents]
    assert np.array_equal(c.get(tokens, as_numpy=True), kv)


def test_commit_with_bad_bytes_is_refused_and_nothing_is_indexed(client, layout, server):
    c = client(transport="arena")
    tokens, kv = make_tokens(32), make_kv(layout, 32)
    stub, arena, plan, resp = _reserve(c, tokens, kv)
    _write(arena, plan, resp, layout)
    last = resp.extents[1]
    view = arena.writable().view(Extent(last.offset_bytes, last.length_bytes))
    view[-1] ^= 0xFF  # the second chunk's last byte: the first chunk alone is fine
    with pytest.raises(grpc.RpcError) as info:
        stub.CommitExtents(pb.CommitExtentsRequest(reservation_id=resp.reservation_id))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "chunk 1" in info.value.details() and "checksum" in info.value.details()
    assert c.lookup(tokens) == 0 and server.engine.dram.stats().num_objects == 0
    assert _reservations(server) == ("0", "0")  # the reservation ended, its space freed
    with pytest.raises(grpc.RpcError) as again:  # and cannot be committed a second time
        stub.CommitExtents(pb.CommitExtentsRequest(reservation_id=resp.reservation_id))
    assert again.value.code() == grpc.StatusCode.NOT_FOUND


def test_expired_reservation_cannot_be_committed(client, layout, server):
    c = client(transport="arena")
    tokens, kv = make_tokens(32), make_kv(layout, 32)
    stub, arena, plan, resp = _reserve(c, tokens, kv, ttl_ms=1)
    _write(arena, plan, resp, layout)
    time.sleep(0.05)
    with pytest.raises(grpc.RpcError) as info:
        stub.CommitExtents(pb.CommitExtentsRequest(reservation_id=resp.reservation_id))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert c.lookup(tokens) == 0 and _reservations(server) == ("0", "0")


def test_garbage_reservations_are_invalid_argument(client, layout, server):
    c = client(transport="arena")
    tokens = make_tokens(32)
    c.lookup(tokens)
    stub = c._conns.stub(0)
    for sizes, what in (([10, 10], "object_bytes is 10"), ([1 << 40, 100], "expected 48"),
                        ([100] * 3, "2 full chunks"), ([], "at least one")):
        with pytest.raises(grpc.RpcError) as info:
            stub.ReserveExtents(pb.ReserveExtentsRequest(
                namespace=c._ns, tokens_le_i32=tokens.tobytes(), object_bytes=sizes))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert what in info.value.details()


def test_killed_writer_reservation_is_reclaimed_after_ttl(tmp_path, layout):
    chunk = layout.chunk_bytes + 1024  # room for one object
    config = make_config(tmp_path / "data", **{"tiers.cpu.capacity_bytes": 4 * chunk,
                                               "tiers.cpu.lease_ttl_s": 1.0})
    script = (
        "import time\n"
        "from kvstore.client import Client, _arena_put as ap, _protocol as proto\n"
        "from tests.conftest import SMALL_LAYOUT, make_kv, make_tokens\n"
        "c = Client(ADDRESS, 'm', SMALL_LAYOUT, transport='arena')\n"
        "plan = proto.plan_put(SMALL_LAYOUT, make_tokens(64), make_kv(SMALL_LAYOUT, 64),"
        " position_free=False)\n"
        "from kvstore.client._plan import Offload\n"
        "steps = ap.put_steps(c._local, 0, c._ns, SMALL_LAYOUT, plan, 'raw', 10.0)\n"
        "stub, reply = c._conns.stub(0), None\n"
        "while True:\n"
        "    step = steps.send(reply)\n"
        "    if isinstance(step, Offload):\n"
        "        reply = step.fn(*step.args)\n"
        "        continue\n"
        "    if step.method == 'CommitExtents':\n"
        "        print('written', flush=True); time.sleep(600)\n"
        "    reply = getattr(stub, step.method)(step.request, timeout=10)\n"
    )
    with ServerThread(config) as server:
        proc = subprocess.Popen([sys.executable, "-c",
                                 script.replace("ADDRESS", repr(server.address))],
                                stdout=subprocess.PIPE, text=True, cwd=ROOT)
        try:
            assert proc.stdout.readline().strip() == "written"
            assert _reservations(server)[0] == "1"  # all 4 chunks written, not committed
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        c = Client(server.address, "m", layout)
        assert c.lookup(make_tokens(64)) == 0  # nothing of the dead writer is visible
        other = make_tokens(64, seed=5), make_kv(layout, 64, seed=5)
        c.put(*other)  # DRAM is all reserved: this put streams to the disk
        assert server.engine.dram.stats().num_objects == 0
        time.sleep(1.2)  # the reservation expires
        assert _reservations(server) == ("0", "0")
        again = make_tokens(64, seed=6), make_kv(layout, 64, seed=6)
        assert c.put(*again) == 64
        assert server.engine.dram.stats().num_objects == 4  # all four fit DRAM again
        assert np.array_equal(c.get(again[0], as_numpy=True), again[1])
        c.close()


def test_put_streams_when_dram_cannot_reserve(tmp_path, layout):
    config = make_config(tmp_path / "data", **{"tiers.cpu.capacity_bytes": 1024})
    with ServerThread(config) as server, Client(server.address, "m", layout) as c:
        tokens, kv = make_tokens(32), make_kv(layout, 32)
        assert c.put(tokens, kv) == 32
        assert server.counters.requests["Put"] == 1  # RESOURCE_EXHAUSTED, then streamed
        assert np.array_equal(c.get(tokens, as_numpy=True), kv)
        with Client(server.address, "m", layout, transport="arena") as forced:
            with pytest.raises(Exception, match="cannot reserve"):
                forced.put(make_tokens(32, seed=2), make_kv(layout, 32, seed=2))


def test_put_streams_when_the_daemon_refuses_the_arena(tmp_path, layout):
    config = make_config(tmp_path / "data", **{"server.same_host": False})
    with ServerThread(config) as server, Client(server.address, "m", layout) as c:
        for seed in (1, 2):  # refused once, then not asked again
            tokens, kv = make_tokens(32, seed=seed), make_kv(layout, 32, seed=seed)
            assert c.put(tokens, kv) == 32
        assert server.counters.requests["Put"] == 2
        assert server.counters.requests.get("ReserveExtents", 0) == 0
        assert server.counters.requests["AttachArena"] == 1


def test_committed_chunks_are_written_back_to_disk(tmp_path, layout):
    config = make_config(tmp_path / "data")
    tokens, kv = make_tokens(64), make_kv(layout, 64)
    with ServerThread(config) as server, Client(server.address, "m", layout) as c:
        c.put(tokens, kv)
        server.engine.flush()
        assert server.engine.stats()[1].num_objects == 4
    with ServerThread(config) as server, Client(server.address, "m", layout) as c:
        assert server.engine.dram.stats().num_objects == 0
        assert np.array_equal(c.get(tokens, as_numpy=True), kv)  # read (verified) from disk


def test_async_client_puts_through_the_arena(layout, server):
    tokens, kv = make_tokens(48), make_kv(layout, 48)

    async def run() -> np.ndarray:
        async with AsyncClient(server.address, "m", layout, transport="arena") as c:
            assert await c.put(tokens, kv) == 48
            assert await c.put_chunk(tokens[:5], kv[:, :, :, :5]) is True
            return await c.get(tokens, as_numpy=True)

    assert np.array_equal(asyncio.run(run()), kv)
    assert server.counters.received_bytes == 0


def test_after_failure_raises_caller_mistakes(layout):
    from kvstore.client._local import LocalPath

    paths = LocalPath("auto")
    with pytest.raises(InvalidArgument):
        arena_put.after_failure(paths, 0, "127.0.0.1:1", InvalidArgument("bad"))
    assert arena_put.after_failure(paths, 0, "127.0.0.1:1", NotFound("restarted")) is \
        arena_put.local.STREAM
