"""The blocking client: ``Client(addresses, namespace, layout)`` (DESIGN §5).

Every method is a plan of ``kvstore.client._core`` run by the blocking driver
below; ``AsyncClient`` runs the same plans on grpc.aio.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from kvstore._proto import kvstore_pb2 as pb
from kvstore.client import _plan
from kvstore.client import _protocol as proto
from kvstore.client._connections import Connections
from kvstore.client._core import STREAMING_PLANS, ClientCore
from kvstore.client._plan import Plan, blocking, blocking_stream, driven_by


def fetch_stats(addresses: str | Sequence[str], *, token: str | None = None,
                tls_ca_file: str | None = None, timeout_s: float = 10.0,
                tls_cert_file: str | None = None, tls_key_file: str | None = None
                ) -> dict[str, Any]:
    """Stats of a daemon without naming a namespace (what ``kvstore stats`` shows)."""
    conns = Connections(addresses, token=token, tls_ca_file=tls_ca_file, timeout_s=timeout_s,
                        max_message_bytes=4 << 20, tls_cert_file=tls_cert_file,
                        tls_key_file=tls_key_file)
    try:
        return conns.call("Stats", lambda stub, t, md: proto.stats_to_dict(
            stub.Stats(pb.StatsRequest(), timeout=t, metadata=md)))
    finally:
        conns.close()


@driven_by(blocking, blocking_stream, STREAMING_PLANS)
class Client(ClientCore):
    """Blocking client of one namespace on one or more daemons (failover in order).

    Args:
        addresses: "HOST:PORT" or a list of them, tried in order on UNAVAILABLE.
        namespace: model id and revision, e.g. "smollm2-135m@main".
        layout: the KV layout of the namespace; the first put fixes it daemon-side.
        token: bearer token, if the daemon has tokens configured.
        tls_ca_file: PEM CA bundle; set to talk TLS.
        tls_cert_file, tls_key_file: PEM client certificate and key, for a daemon that
            requires client certificates (mutual TLS).
        timeout_s: overall deadline of each call, failover attempts included.
        max_message_bytes: largest gRPC message; objects are split below it.
        tp_rank: tensor-parallel rank whose heads this client stores.
        transport: how ``get``/``get_chunk`` read: "auto" maps the daemon's DRAM arena
            when it is on this host (loopback address, matching nonce) and streams
            otherwise; "arena" insists on the arena (errors say why it cannot be
            used); "stream" always streams over gRPC. ``get_layers`` always streams.
        codec: how ``put``/``put_chunk`` store chunks, a name from ``kvstore.codec.LEVELS``.
            "raw" (the default) round-trips bit-exact; a kvq level ("balanced", ...)
            is lossy and several times smaller: ``get`` then returns exactly
            ``kvstore.codec.decode(kvstore.codec.encode(kv, layout, codec, table=t))``
            with ``t = kvstore.codec.autocal.table_for(namespace, layout, kv)``, the
            calibration table picked for the namespace's model without the user.
        max_blob_part_bytes: ``put_blob`` stores larger blobs in parts of this size.
        copy_threads: threads a same-host ``put`` or ``get`` of 4 MiB or more splits
            its chunks across (this thread included; each chunk copied and hashed
            whole on one). None: 2 where this process may use 2 or more cores, else 1.
            1 keeps every copy on the calling thread (a busy host, or cores pinned
            to other work).

    Tensors are ``[layers, 2, kv_heads, tokens, head_dim]`` torch tensors or numpy
    arrays in ``layout.dtype``. numpy has no bfloat16: pass and receive bfloat16 as
    a uint16 array of its bit patterns (``t.view(torch.int16).numpy().view("u2")``).
    """

    connections = Connections

    def _run(self, plan: Plan[Any]) -> Any:
        """Drive a plan that emits nothing; its result."""
        driven = self._drive(plan)
        try:
            next(driven)
        except StopIteration as stop:
            return stop.value
        driven.close()
        raise AssertionError("a plan emitted outside get_layers")

    def _iterate(self, plan: Plan[None]) -> Iterator[Any]:
        yield from self._drive(plan)

    def _drive(self, plan: Plan[Any]) -> Any:
        """Perform a plan's effects with blocking gRPC; yields what it emits, returns its
        result. An effect's exception is raised inside the plan, at its ``yield``."""
        value: Any = None
        error: Exception | None = None
        try:
            while True:
                try:
                    effect = plan.send(value) if error is None else plan.throw(error)
                except StopIteration as stop:
                    return stop.value
                value, error = None, None
                if isinstance(effect, _plan.Emit):
                    yield effect.value
                    continue
                try:
                    value = self._perform(effect)
                except Exception as exc:  # raised in the plan, which decides
                    error = exc
        finally:
            plan.close()

    def _perform(self, effect: Any) -> Any:
        if isinstance(effect, _plan.Receive):
            return next(effect.stream, _plan.END)
        if isinstance(effect, _plan.Offload):
            return effect.fn(*effect.args)
        call = _plan.start_call(self._conns, effect)
        if isinstance(effect, _plan.OpenStream):
            return read_ahead(call) if effect.read_ahead else iter(call)
        return call

    def close(self) -> None:
        self._local.close()
        self._gpu.close()
        self._conns.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_ahead(stream: Any) -> Iterator[Any]:
    """The messages of a response stream, read by a background thread as they arrive.

    While the caller works on layer l, later layers keep arriving: without the
    thread, gRPC's flow-control window fills and the daemon stalls until the caller
    asks for the next message, so nothing would overlap. Errors are re-raised here.
    """
    messages: queue.SimpleQueue[Any] = queue.SimpleQueue()
    end = object()

    def read() -> None:
        try:
            for msg in stream:
                messages.put(msg)
        except BaseException as exc:  # handed to the consuming thread
            messages.put(exc)
        messages.put(end)

    threading.Thread(target=read, name="kvstore-get-layers", daemon=True).start()
    try:
        while (item := messages.get()) is not end:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stream.cancel()  # a no-op once the stream ended; stops the reader if we quit early

