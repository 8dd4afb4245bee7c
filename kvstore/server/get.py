"""Streaming of stored chunks for Get (and reads for FetchBlocks): load, verify, frame.

Objects are read on the servicer's thread pool (the engine blocks on disk and
Redis); the event loop only frames and yields. A corrupt object is dropped from the
tiers and counted, and the stream ends there as if the chunk had been evicted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any

import grpc
import xxhash

from kvstore import _frames as frames
from kvstore.errors import CapacityExhausted, Corrupt, DeadlineExceeded
from kvstore.keys import ChunkKey
from kvstore.server import objects
from kvstore.server.metrics import ServiceCounters

if TYPE_CHECKING:
    from kvstore.engine import Engine

log = logging.getLogger(__name__)
# Room for a response's fields around its `data` when checking the message limit.
ENVELOPE_BYTES = 1024
# Layer-major messages carry one layer of this many bytes of consecutive chunks at most.
LAYER_GROUP_BYTES = 4 << 20


def check_deadline(context: grpc.aio.ServicerContext, done: int, total: int) -> None:
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        raise DeadlineExceeded(f"deadline passed after {done} of {total} messages")


class ChunkStreamer:
    """Loads stored chunks through the engine and frames them as GetResponse bytes."""

    def __init__(self, engine: Engine, executor: Executor, counters: ServiceCounters,
                 max_message_bytes: int) -> None:
        self._engine = engine  # blocking, thread-safe
        self._executor = executor
        self._counters = counters
        self._max_message_bytes = max_message_bytes

    def load(self, key: ChunkKey, encoded: bool) -> bytes | None:
        """A stored object (verified; raw unless ``encoded``) or None; a corrupt one is
        dropped and counted. A corrupt DRAM copy is dropped alone and the chunk read
        again, from a lower tier that still has a good copy."""
        for _ in range(2):
            obj = self._engine.get(key)
            if obj is None:
                return None
            try:
                if encoded:
                    objects.verify_stored(obj)
                    return obj
                started = time.perf_counter()
                raw = objects.stored_to_raw(obj)
                if raw is not obj:  # decoded (kvq) and re-packed raw: the daemon's codec work
                    self._counters.observe_codec("decode", time.perf_counter() - started)
                return raw
            except Corrupt as exc:
                self._counters.count_corrupt_read()
                log.warning("dropping stored object %s: %s", key.hex()[:16], exc)
                self._engine.drop_corrupt(key, obj)  # a bad DRAM copy spares good disk copies
        return None

    def _load_run(self, keys: list[ChunkKey]) -> list[bytes]:
        """Raw objects of the leading run of keys that load cleanly."""
        loaded: list[bytes] = []
        for key in keys:
            obj = self.load(key, False)
            if obj is None:
                break
            loaded.append(obj)
        return loaded

    def message_limit(self, client_limit: int) -> int:
        """Largest message to send: the daemon's limit, or the client's if smaller."""
        if client_limit <= 0:
            return self._max_message_bytes
        return min(self._max_message_bytes, client_limit)

    async def layer_major(self, keys: list[ChunkKey], layers: list[int],
                          context: Any, *, limit: int) -> AsyncIterator[bytes]:
        """Layer by layer; each message carries one layer of as many consecutive chunks
        as fit ``LAYER_GROUP_BYTES`` (and the message limit).

        *Why groups:* fewer, larger messages stream faster through gRPC Python
        (bench/bench_store.py); on this VM groups moved the layer-wise overlap of
        bench_local.py only from -0.03 to 0.04 (docs/design.md §8).
        """
        # Every chunk is needed for layer 0, so load the run first; the count is then exact.
        loop = asyncio.get_running_loop()
        raws = await loop.run_in_executor(self._executor, self._load_run, keys)
        if not raws:
            return
        layer_bytes = len(objects.layer_bytes(raws[0], layers[0]))
        room = min(LAYER_GROUP_BYTES, limit - ENVELOPE_BYTES)
        group = max(1, room // max(layer_bytes, 1))
        for i, layer in enumerate(layers):
            for first in range(0, len(raws), group):
                check_deadline(context, i * len(raws) + first, len(raws) * len(layers))
                yield _layer_message(raws[first : first + group], first, layer,
                                     len(raws))

    async def chunk_major(self, keys: list[ChunkKey], encoded: bool, layers: list[int],
                          context: Any, *, layer_filter: bool, limit: int
                          ) -> AsyncIterator[bytes]:
        """Each chunk as one object (encoded, or raw without a ``layer_filter`` when the
        object fits a message), else one message per (chunk, layer) of ``layers``.

        Whole raw objects: with hand-framed messages (kvstore._frames) gRPC streams a
        5.9 MB message faster than 30 of 196 KiB (bench/bench_store.py: get from DRAM
        ~1.25x, ``client_get_dram`` vs ``client_get_dram_per_layer``); raw objects of
        one namespace all have the same size, so a stream is either whole objects
        throughout or per layer throughout.
        """
        loop = asyncio.get_running_loop()
        pending = loop.run_in_executor(self._executor, self.load, keys[0], encoded)
        for index in range(len(keys)):
            obj = await pending
            if obj is None:
                return  # evicted or corrupt since the lookup: the stream ends early
            if index + 1 < len(keys):  # read the next chunk while this one is sent
                pending = loop.run_in_executor(self._executor, self.load, keys[index + 1],
                                               encoded)
            check_deadline(context, index, len(keys))
            fits = len(obj) + ENVELOPE_BYTES <= limit
            if not encoded and (layer_filter or not fits):
                for layer in layers:
                    yield _layer_message([obj], index, layer, len(keys))
                continue
            if not fits:
                raise CapacityExhausted(
                    f"chunk {index} is a {len(obj)}-byte object, over the "
                    f"{limit}-byte message limit; ask for layer-major order "
                    "or a layer filter"
                )
            yield frames.get_response(chunk_index=index, data=obj, num_chunks=len(keys))


def _layer_message(raws: list[bytes], first: int, layer: int,
                   num_chunks: int) -> bytes:
    """One layer of consecutive chunks ``first..`` (``[2, heads, tokens, dim]`` each)."""
    parts = [objects.layer_bytes(raw, layer) for raw in raws]
    hasher = xxhash.xxh3_64()
    for part in parts:
        hasher.update(part)
    return frames.get_response(chunk_index=first, layer=layer, data=parts,
                               checksum_xxh3=hasher.intdigest(), num_chunks=num_chunks,
                               num_chunks_in_data=len(parts) if len(parts) > 1 else 0)
