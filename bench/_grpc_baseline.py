"""Baseline for the streamed path: a bare grpc.aio server streaming bytes, no kvstore code.

    python bench/_grpc_baseline.py serve SIZE   # prints its port, streams on request

`bare_stream_mb_s(total_bytes, message_bytes)` starts that server in a subprocess
(so client and server use separate cores, as with the daemon) and returns the MB/s
a plain sync gRPC client receives.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import grpc

_OPTIONS = [("grpc.max_send_message_length", 64 << 20),
            ("grpc.max_receive_message_length", 64 << 20)]


async def _serve() -> None:
    server = grpc.aio.server(options=_OPTIONS)

    async def stream(request: bytes, context: object):  # request: b"total,message_bytes"
        total, size = map(int, request.decode().split(","))
        payload = bytes(size)
        for _ in range(max(1, total // size)):
            yield payload

    handler = grpc.method_handlers_generic_handler(
        "bench", {"Stream": grpc.unary_stream_rpc_method_handler(stream)})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


def bare_stream_mb_s(total_bytes: int, message_bytes: int, repeat: int = 3) -> float:
    """Best MB/s of receiving ``total_bytes`` in ``message_bytes`` messages."""
    proc = subprocess.Popen([sys.executable, __file__, "serve"], stdout=subprocess.PIPE,
                            text=True)
    try:
        port = int(proc.stdout.readline())  # type: ignore[union-attr]
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=_OPTIONS) as channel:
            call = channel.unary_stream("/bench/Stream")
            best = float("inf")
            for _ in range(repeat + 1):  # the first run warms up
                start = time.perf_counter()
                received = sum(len(m) for m in call(f"{total_bytes},{message_bytes}".encode()))
                best = min(best, time.perf_counter() - start)
        return received / 1e6 / best
    finally:
        proc.kill()
        proc.wait()


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        asyncio.run(_serve())
