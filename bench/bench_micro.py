"""The micro-measurements behind six data-path decisions, each against its alternative.

- ``frame``: serialising one 196 KiB GetResponse with protobuf vs
  ``kvstore._frames.get_response`` (docs/design.md §8).
- ``parse``: the client's parse of one 5.9 MB GetResponse and read of its data:
  protobuf vs ``kvstore._frames.parse_get_response``.
- ``redis_pack``: hiredis's command packer vs redis-py's ``PythonRespSerializer``
  (what the Redis tier uses) for one SET of a 256 KiB and a 5.9 MB value.
- ``redis_pipeline_send``: a pipeline of SETs sent with one ``sendall`` per buffer
  (redis-py) vs one ``sendmsg`` per round (``redis_nodes.VectoredConnection``), both
  with the zero-copy packer, to a redis-server started on a free port.
- ``checksum``: xxh64 vs XXH3-64 over one 5.9 MB object (the KVC1 checksum, §3).
- ``arena_first_write``: copying 5.9 MB objects through a fresh shared-memory
  mapping, first pass without and with ``arena_file.prefault`` (§5).

    python bench/bench_micro.py           # full sizes
    python bench/bench_micro.py --smoke   # tiny, for CI
"""

from __future__ import annotations

import argparse
import mmap
import os
import sys
import tempfile
import time
from pathlib import Path

import xxhash

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import best_seconds, emit  # noqa: E402

from kvstore import _frames as frames  # noqa: E402
from kvstore._proto import kvstore_pb2 as pb  # noqa: E402
from kvstore.arena_file import prefault  # noqa: E402

LAYER_BYTES = 196_608  # one SmolLM2 layer of a 256-token chunk, fp16
CHUNK_BYTES = 5_898_240  # one SmolLM2 chunk


def _per_call(fn, arg, n: int, repeat: int) -> float:
    """Best seconds per call of ``fn(arg)`` over batches of ``n`` calls."""
    def batch() -> None:
        for _ in range(n):
            fn(arg)
    return best_seconds(batch, repeat) / n


def bench_frame(repeat: int) -> None:
    data = os.urandom(LAYER_BYTES)

    def protobuf() -> bytes:
        return pb.GetResponse(chunk_index=3, layer=4, data=data, checksum_xxh3=1,
                              num_chunks=9).SerializeToString()

    def framed() -> bytes:
        return frames.get_response(chunk_index=3, layer=4, data=data, checksum_xxh3=1,
                                   num_chunks=9)

    assert pb.GetResponse.FromString(framed()) == pb.GetResponse.FromString(protobuf())
    # each message is dropped before the next is built, as when it has been sent
    us = {name: _per_call(lambda _, f=f: f(), None, 200, repeat) * 1e6
          for name, f in (("protobuf", protobuf), ("framed", framed))}
    emit("micro", "frame", message_bytes=LAYER_BYTES, protobuf_us=round(us["protobuf"], 1),
         framed_us=round(us["framed"], 1), speedup=round(us["protobuf"] / us["framed"], 1))


def bench_parse(repeat: int) -> None:
    """Client side of a whole-object GetResponse: protobuf parse + reading ``data``
    (upb copies both times) vs ``frames.parse_get_response`` (a view)."""
    wire = frames.get_response(chunk_index=3, data=os.urandom(CHUNK_BYTES), num_chunks=9)

    def protobuf(_: object) -> int:
        return len(pb.GetResponse.FromString(wire).data)

    def by_hand(_: object) -> int:
        return len(frames.parse_get_response(wire).data)

    us = {name: _per_call(f, None, 20, repeat) * 1e6
          for name, f in (("protobuf", protobuf), ("by_hand", by_hand))}
    emit("micro", "parse", message_bytes=len(wire), protobuf_us=round(us["protobuf"], 1),
         by_hand_us=round(us["by_hand"], 1))


def bench_redis_pack(sizes: list[int], repeat: int) -> None:
    import hiredis
    from redis.connection import Encoder, PythonRespSerializer

    python = PythonRespSerializer(6000, Encoder("utf-8", "strict", False).encode)
    for size in sizes:
        value = os.urandom(size)
        n = max(4, (64 << 20) // size)
        hi = _per_call(lambda v: hiredis.pack_command((b"SET", b"k", v)), value, n, repeat)
        py = _per_call(lambda v: python.pack(b"SET", b"k", v), value, n, repeat)
        emit("micro", "redis_pack", value_bytes=size, hiredis_us=round(hi * 1e6, 1),
             python_us=round(py * 1e6, 1), hiredis_gb_s=round(size / hi / 1e9, 2))


def bench_redis_pipeline_send(cases: list[tuple[int, int]], repeat: int) -> None:
    """SET pipelines of (value bytes, values per pipeline), 256 MB or 64 values each."""
    import redis
    from bench_redis import start_server

    from kvstore.tiers.redis_nodes import VectoredConnection, use_zero_copy_packer

    proc, port, _ = start_server()
    try:
        vectored = use_zero_copy_packer(redis.Redis(port=port))
        plain = use_zero_copy_packer(redis.Redis(port=port))
        plain.connection_pool.connection_class = redis.Connection
        assert vectored.connection_pool.connection_class is VectoredConnection
        for size, batch in cases:
            value = os.urandom(size)
            keys = [b"k%d" % i for i in range(max(64, (256 << 20) // size))]

            def put(client, keys=keys, value=value, batch=batch) -> None:
                for start in range(0, len(keys), batch):
                    pipe = client.pipeline(transaction=False)
                    for key in keys[start : start + batch]:
                        pipe.set(key, value)
                    pipe.execute()

            best = {"sendall": float("inf"), "sendmsg": float("inf")}
            for _ in range(repeat + 1):  # interleaved, so both see the same machine
                for name, client in (("sendall", plain), ("sendmsg", vectored)):
                    start = time.perf_counter()
                    put(client)
                    best[name] = min(best[name], time.perf_counter() - start)
            mb = len(keys) * size / 1e6
            emit("micro", "redis_pipeline_send", value_bytes=size, values_per_pipeline=batch,
                 sendall_mb_s=round(mb / best["sendall"]), sendmsg_mb_s=round(mb / best["sendmsg"]))
    finally:
        proc.kill()
        proc.wait()


def bench_checksum(size: int, repeat: int) -> None:
    data = os.urandom(size)
    gb_s = {name: size / best_seconds(lambda f=f: f(data), repeat) / 1e9
            for name, f in (("xxh64", xxhash.xxh64_intdigest),
                            ("xxh3_64", xxhash.xxh3_64_intdigest))}
    emit("micro", "checksum", bytes=size, xxh64_gb_s=round(gb_s["xxh64"], 2),
         xxh3_64_gb_s=round(gb_s["xxh3_64"], 2))


def bench_arena_first_write(map_bytes: int, object_bytes: int) -> None:
    src = os.urandom(object_bytes)
    directory = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    result = {}
    for name in ("fresh", "prefaulted"):
        fd, path = tempfile.mkstemp(dir=directory, prefix="kvstore-bench-micro-")
        try:
            os.posix_fallocate(fd, 0, map_bytes)
            mapped = mmap.mmap(fd, map_bytes)
            if name == "prefaulted":
                start = time.perf_counter()
                prefault(mapped)
                result["prefault_s"] = round(time.perf_counter() - start, 3)
            view = memoryview(mapped)
            for pass_ in ("first", "second"):
                start, offset = time.perf_counter(), 0
                while offset + object_bytes <= map_bytes:
                    view[offset : offset + object_bytes] = src
                    offset += object_bytes
                result[f"{name}_{pass_}_pass_gb_s"] = round(
                    offset / (time.perf_counter() - start) / 1e9, 2)
            view.release()
            mapped.close()
        finally:
            os.close(fd)
            os.unlink(path)
    emit("micro", "arena_first_write", map_bytes=map_bytes, object_bytes=object_bytes, **result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for CI")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    repeat = 1 if args.smoke else args.repeat
    bench_frame(repeat)
    bench_parse(repeat)
    bench_redis_pack([262_144] if args.smoke else [262_144, CHUNK_BYTES], repeat)
    bench_redis_pipeline_send([(262_144, 16)] if args.smoke
                              else [(262_144, 16), (CHUNK_BYTES, 4)], repeat)
    bench_checksum(1 << 20 if args.smoke else CHUNK_BYTES, repeat)
    bench_arena_first_write(16 << 20 if args.smoke else 512 << 20, CHUNK_BYTES)


if __name__ == "__main__":
    main()
