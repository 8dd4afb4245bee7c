"""One soak client process: mixed put/get/get_layers/lookup/delete, every read verified.

Each client owns ``num_slots`` sequences no other client touches, so it alone knows
what must be stored: a ledger says per slot whether the last acknowledged call put
it (PRESENT), deleted it (ABSENT) or failed part way (UNKNOWN). Every chunk's
tensor is a function of its token prefix, and the client keeps the XXH3-64 of each
chunk (and of each layer of it); a read is checked chunk by chunk against them, so
wrong bytes are counted whatever their cause. After each daemon restart the parent
bumps ``verify_round`` and every client re-reads all PRESENT slots: an acknowledged
put that is gone is a lost write. The last ``num_victim_slots`` slots are the ones
the fault injector corrupts; they are read and checked like the rest but left out
of the lost-write count.
"""

from __future__ import annotations

import random
import time
import traceback
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xxhash

ABSENT, PRESENT, UNKNOWN = 0, 1, 2
OPS = ("put", "get", "get_layers", "lookup", "delete")


@dataclass(frozen=True, slots=True)
class SoakSpec:
    """What every client process needs; picklable (processes are spawned)."""

    address: str
    namespace: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    chunk_tokens: int
    num_slots: int  # sequences per client
    num_victim_slots: int  # the last slots, which the fault injector may corrupt
    max_chunks: int  # a slot holds 1..max_chunks chunks
    op_weights: tuple[float, ...]  # in OPS order
    seed: int
    timeout_s: float = 10.0
    # A failure this soon after a daemon restart, while the client reconnects, counts
    # as the restart's, not as a failed call.
    reconnect_grace_s: float = 5.0

    def layout(self) -> Any:
        from kvstore.layout import KVLayout

        return KVLayout(num_layers=self.num_layers, num_kv_heads=self.num_kv_heads,
                        head_dim=self.head_dim, dtype="float16", chunk_tokens=self.chunk_tokens)

    def is_victim(self, slot: int) -> bool:
        return slot >= self.num_slots - self.num_victim_slots


def slot_tokens(spec: SoakSpec, client_id: int, slot: int) -> np.ndarray:
    """The tokens of one client's slot: 1..max_chunks full chunks, unique to (client, slot)."""
    num_chunks = 1 + slot % spec.max_chunks
    rng = np.random.default_rng([spec.seed, client_id, slot])
    return rng.integers(0, 50_000, num_chunks * spec.chunk_tokens, dtype=np.int32)


def kv_for(spec: SoakSpec, tokens: np.ndarray) -> np.ndarray:
    """KV ``[layers, 2, heads, tokens, dim]`` fp16 whose chunk i depends only on tokens[:end_i]."""
    layout, t = spec.layout(), spec.chunk_tokens
    chunks = []
    for end in range(t, len(tokens) + 1, t):
        seed = xxhash.xxh3_64_intdigest(tokens[:end].tobytes())
        rng = np.random.default_rng(seed)
        chunks.append(rng.standard_normal(layout.shape(t), dtype=np.float32).astype(np.float16))
    return np.concatenate(chunks, axis=3)


def chunk_digests(kv: np.ndarray, chunk_tokens: int) -> list[int]:
    """XXH3-64 of each chunk's bytes in canonical order."""
    n = kv.shape[3] // chunk_tokens
    return [xxhash.xxh3_64_intdigest(np.ascontiguousarray(
        kv[:, :, :, i * chunk_tokens:(i + 1) * chunk_tokens]).tobytes()) for i in range(n)]


@dataclass(slots=True)
class Slot:
    tokens: np.ndarray
    kv: np.ndarray
    digests: list[int]  # per chunk
    layer_digests: list[list[int]]  # [layer][chunk]
    state: int = ABSENT
    acked_at: float = 0.0  # wall time of the last acknowledged put


@dataclass(slots=True)
class ClientTally:
    """Everything one client measured; summed by the parent."""

    ops: Counter = field(default_factory=Counter)
    latency_ms: dict = field(default_factory=lambda: defaultdict(list))
    misses: Counter = field(default_factory=Counter)  # per op: fewer tokens than stored
    wrong_chunks: Counter = field(default_factory=Counter)  # per op: digest mismatch
    wrong_bytes: int = 0
    resurrected: int = 0  # a chunk read back after its delete was acknowledged
    resurrected_examples: list = field(default_factory=list)
    wrong_examples: list = field(default_factory=list)  # the first few wrong chunks read
    failed: Counter = field(default_factory=Counter)  # "op:ErrorType" not explained by a fault
    failed_examples: list = field(default_factory=list)
    unavailable_restart: int = 0  # calls failed while the daemon was down or restarting
    refused_puts: int = 0  # CapacityExhausted puts (e.g. while the disk was full)


class SoakClient:
    def __init__(self, client_id: int, spec: SoakSpec, shared: Any) -> None:
        from kvstore.client import Client

        self.id, self.spec, self.shared = client_id, spec, shared
        self.layout = spec.layout()
        self.rng = random.Random(spec.seed * 1000 + client_id)
        transport = "auto" if client_id % 2 == 0 else "stream"  # half read through the arena
        self.client = Client(spec.address, spec.namespace, self.layout,
                             timeout_s=spec.timeout_s, transport=transport)
        self.slots = [self._slot(s) for s in range(spec.num_slots)]
        self.tally = ClientTally()
        self.verify_round = shared.verify_round.value

    def _slot(self, index: int) -> Slot:
        tokens = slot_tokens(self.spec, self.id, index)
        kv = kv_for(self.spec, tokens)
        t = self.spec.chunk_tokens
        layer_digests = [chunk_digests(kv[layer:layer + 1], t)
                         for layer in range(self.layout.num_layers)]
        return Slot(tokens, kv, chunk_digests(kv, t), layer_digests)

    def run(self) -> None:
        while not self.shared.stop.is_set():
            if not self.shared.daemon_up.value:
                time.sleep(0.05)  # the conductor is restarting the daemon: hold new calls
                continue
            if self.shared.verify_round.value != self.verify_round:
                self.verify_round = self.shared.verify_round.value
                self.shared.results.put(("verify", self.id, (self.verify_round, self.verify())))
            op = self.rng.choices(OPS, weights=self.spec.op_weights)[0]
            slot = self.rng.randrange(self.spec.num_slots)
            self.timed(op, slot)

    def timed(self, op: str, index: int) -> None:
        slot, epoch = self.slots[index], self.shared.epoch.value
        start = time.perf_counter()
        try:
            getattr(self, "_" + op)(slot, index)
        except Exception as exc:  # noqa: BLE001 - every failure is classified and counted
            self._failed(op, slot, exc, epoch)
            return
        finally:
            with self.shared.num_ops.get_lock():
                self.shared.num_ops.value += 1
        self.tally.ops[op] += 1
        self.tally.latency_ms[op].append((time.perf_counter() - start) * 1000)

    def _failed(self, op: str, slot: Slot, exc: Exception, epoch: int) -> None:
        from kvstore.errors import CapacityExhausted

        if op in ("put", "delete"):
            slot.state = UNKNOWN
        since_restart = time.time() - self.shared.restarted_at.value
        if (self.shared.epoch.value != epoch or not self.shared.daemon_up.value
                or since_restart < self.spec.reconnect_grace_s):
            self.tally.unavailable_restart += 1
            time.sleep(0.1)  # back off as a real client would while the daemon is away
        elif op == "put" and isinstance(exc, CapacityExhausted):
            self.tally.refused_puts += 1
        else:
            self.tally.failed[f"{op}:{type(exc).__name__}"] += 1
            if len(self.tally.failed_examples) < 5:
                self.tally.failed_examples.append(
                    f"{op}: {''.join(traceback.format_exception_only(exc)).strip()[:300]}")

    # ------------------------------------------------------------ operations

    def _put(self, slot: Slot, index: int) -> None:
        self.client.put(slot.tokens, slot.kv)
        slot.state, slot.acked_at = PRESENT, time.time()

    def _delete(self, slot: Slot, index: int) -> None:
        self.client.delete(slot.tokens)
        slot.state = ABSENT

    def _lookup(self, slot: Slot, index: int) -> None:
        n = self.client.lookup(slot.tokens)
        self._count_coverage("lookup", slot, n // self.spec.chunk_tokens)

    def _get(self, slot: Slot, index: int) -> None:
        out = self.client.get(slot.tokens, as_numpy=True)
        num = 0 if out is None else out.shape[3] // self.spec.chunk_tokens
        if num:
            self._check(out, slot.digests, "get", index)
        self._count_coverage("get", slot, num)

    def _get_layers(self, slot: Slot, index: int) -> None:
        num = None
        for layer, arr in self.client.get_layers(slot.tokens, as_numpy=True):
            self._check(arr[None], slot.layer_digests[layer], "get_layers", index)
            num = arr.shape[2] // self.spec.chunk_tokens
        self._count_coverage("get_layers", slot, num or 0)

    def _check(self, out: np.ndarray, digests: list[int], op: str, index: int) -> None:
        got = chunk_digests(out, self.spec.chunk_tokens)
        for i, digest in enumerate(got):
            if i >= len(digests) or digest != digests[i]:
                self.tally.wrong_chunks[op] += 1
                self.tally.wrong_bytes += out.nbytes // max(1, len(got))
                if len(self.tally.wrong_examples) < 3:
                    self.tally.wrong_examples.append(
                        {"op": op, "chunk": i, "victim_slot": self.spec.is_victim(index),
                         "at_wall_s": round(time.time(), 1)})

    def _count_coverage(self, op: str, slot: Slot, num_chunks: int) -> None:
        if slot.state == PRESENT and num_chunks < len(slot.digests):
            self.tally.misses[op] += 1
        elif slot.state == ABSENT and num_chunks > 0:
            self.tally.resurrected += 1
            if len(self.tally.resurrected_examples) < 3:
                self.tally.resurrected_examples.append(
                    {"op": op, "at_wall_s": round(time.time(), 1), "chunks": num_chunks})

    # ------------------------------------------------------------ after a restart

    def verify(self) -> dict[str, Any]:
        """Re-read every PRESENT slot outside the victims; returns lost writes and their ages."""
        now, lost_ages, checked, errors = time.time(), [], 0, Counter()
        for index, slot in enumerate(self.slots):
            if slot.state != PRESENT or self.spec.is_victim(index):
                continue
            checked += 1
            try:
                out = self._get_retrying(slot)
            except Exception as exc:  # noqa: BLE001 - counted; the slot's fate is unknown
                errors[type(exc).__name__] += 1
                continue
            num = 0 if out is None else out.shape[3] // self.spec.chunk_tokens
            if num:
                self._check(out, slot.digests, "verify", index)
            if num < len(slot.digests):
                lost_ages.append(now - slot.acked_at)
                slot.state = UNKNOWN
        return {"checked": checked, "lost": len(lost_ages), "errors": sum(errors.values()),
                "error_kinds": dict(errors), "lost_ages_s": sorted(lost_ages)[-5:]}

    def _get_retrying(self, slot: Slot, attempts: int = 5) -> np.ndarray | None:
        """A get that rides out the seconds after a restart (reconnecting, draining)."""
        from kvstore.errors import Unavailable

        for attempt in range(attempts):
            try:
                return self.client.get(slot.tokens, as_numpy=True)
            except Unavailable:
                if attempt == attempts - 1:
                    raise
                time.sleep(1.0)
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.client.close()


def client_main(client_id: int, spec: SoakSpec, shared: Any) -> None:
    """Process entry point: run until ``shared.stop``, then send the tally."""
    import logging

    # The client logs each arena read it had to stream instead while the daemon was
    # down; the tally counts those, and the progress bar owns stderr.
    logging.basicConfig(level=logging.ERROR)
    client = SoakClient(client_id, spec, shared)
    shared.results.put(("ready", client_id, None))
    try:
        client.run()
    finally:
        tally = client.tally
        shared.results.put(("final", client_id, {
            "ops": dict(tally.ops), "latency_ms": dict(tally.latency_ms),
            "misses": dict(tally.misses), "wrong_chunks": dict(tally.wrong_chunks),
            "wrong_bytes": tally.wrong_bytes, "resurrected": tally.resurrected,
            "resurrected_examples": tally.resurrected_examples,
            "wrong_examples": tally.wrong_examples,
            "failed": dict(tally.failed), "failed_examples": tally.failed_examples,
            "unavailable_restart": tally.unavailable_restart,
            "refused_puts": tally.refused_puts}))
        client.close()
