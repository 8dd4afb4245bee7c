"""The Redis tier: one key per chunk on a standalone server, a Sentinel master or a Cluster.

Keys are ``key_prefix + hex(chunk key)``; each is a hash of two fields: ``o``, the
KVC1 object exactly as the engine encoded it (the codec is chosen upstream), and
``k``, its key record (``tiers/record.py``), which names the chunk. One HMGET reads
both without copying the object; every read checks the record and verifies the
object, so a value copied to another key, or a plain string value (written before
records existed), is a corrupt miss and is deleted.
Every Redis error or timeout is a miss (get/contains) or a refused write (put),
counted in ``stats().errors``; a per-node circuit breaker stops calling a dead
node until a probe finds it answering again. A daemon started while Redis is
down starts anyway, reports ``state=down`` and connects when Redis appears.
A delete that Redis does not confirm (its master is down, or the replicas connected to
it do not acknowledge it within ``delete_wait_s``, WAIT) leaves a tombstone
(``tiers/tombstones.py``): the key is a miss here until a retry, every
``circuit_open_s``, is confirmed (on the promoted replica after a failover), so an
acknowledged delete is never undone by a failover.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import redis

from kvstore.codec.format import verify_object
from kvstore.config import MiB, RedisTierConfig
from kvstore.errors import Corrupt, InvalidArgument
from kvstore.keys import ChunkKey
from kvstore.tiers.base import TierStats
from kvstore.tiers.burst_log import BurstLog
from kvstore.tiers.circuit import CircuitBreaker
from kvstore.tiers.record import check_record, pack_record
from kvstore.tiers.redis_nodes import (
    NODE_ERRORS,
    NodeOptions,
    RedisNode,
    Router,
    connect_router,
    parse_redis_url,
)
from kvstore.tiers.tombstones import Tombstones

log = logging.getLogger(__name__)

# Redis refuses bulk strings above proto-max-bulk-len (512 MiB by default).
REDIS_MAX_BULK_BYTES = 512 * MiB
_FAILED: Any = object()  # reply slot of a command whose node failed or was not called
_WRONG_TYPE: Any = object()  # reply slot of a command that met a value of another type
AddCommand = Callable[[Any, int], None]  # (pipeline, index) -> queue the index's commands
_RECORD_FIELD = b"k"  # hash field of the key record
_OBJECT_FIELD = b"o"  # hash field of the KVC1 object


@dataclass(slots=True)
class _ServerFigures:
    """Server-side figures summed over the masters, cached for ``stats_cache_s``."""

    used_bytes: int = 0  # used_memory, all keys of the servers (Redis may be shared)
    capacity_bytes: int = 0  # maxmemory; 0 = unlimited
    num_objects: int = 0  # DBSIZE, all keys
    evictions: int = 0  # evicted_keys since server start
    taken_at: float = float("-inf")  # time.monotonic() of the last refresh


def _connected_replicas(role: Any) -> int:
    """Replicas a master lists in its ROLE reply; 0 from a replica or an error."""
    if isinstance(role, list) and len(role) >= 3 and role[0] in (b"master", "master"):
        return len(role[2])
    return 0


def _check_config(config: RedisTierConfig) -> None:
    if not config.url:
        raise InvalidArgument("tiers.redis.url is not set; the Redis tier needs an address")
    if "{" in config.key_prefix or "}" in config.key_prefix:
        raise InvalidArgument(f"tiers.redis.key_prefix {config.key_prefix!r} contains a hash "
                              "tag brace; it would pin every chunk to one cluster slot")
    if not 0 < config.max_value_bytes <= REDIS_MAX_BULK_BYTES:
        raise InvalidArgument(f"tiers.redis.max_value_bytes is {config.max_value_bytes}; it must "
                              f"be in (0, {REDIS_MAX_BULK_BYTES}] (Redis proto-max-bulk-len)")
    if config.timeout_s <= 0 or config.circuit_open_s <= 0 or config.circuit_failures < 1:
        raise InvalidArgument("tiers.redis.timeout_s and circuit_open_s must be > 0 and "
                              f"circuit_failures >= 1, got {config.timeout_s}, "
                              f"{config.circuit_open_s}, {config.circuit_failures}")
    if config.ttl_s is not None and config.ttl_s <= 0:
        raise InvalidArgument(f"tiers.redis.ttl_s must be > 0 or unset, got {config.ttl_s}")
    if not 0 <= config.delete_wait_s < config.timeout_s:
        raise InvalidArgument(f"tiers.redis.delete_wait_s is {config.delete_wait_s}; it must be "
                              f">= 0 and below timeout_s ({config.timeout_s}), or the read of "
                              "the WAIT reply would time out")


class RedisTier:
    """Shared, compressed tier on Redis (DESIGN §4, §8). Thread-safe."""

    name = "redis"

    def __init__(self, config: RedisTierConfig) -> None:
        """Parse the address and try to connect; an unreachable Redis is not an error.

        Raises:
            InvalidArgument: the config is malformed (url, key_prefix, sizes, timings).
        """
        _check_config(config)
        self._config = config
        self._address = parse_redis_url(config.url or "")
        self._options = NodeOptions(self._address, config.timeout_s, config.circuit_failures,
                                    config.circuit_open_s)
        self._prefix = config.key_prefix.encode()
        self._ttl_ms = None if config.ttl_s is None else max(1, round(config.ttl_s * 1000))
        self._router: Router | None = None
        self._connect_breaker = CircuitBreaker(1, config.circuit_open_s)
        self._connect_lock = threading.Lock()
        self._lock = threading.Lock()  # guards the counters below
        self._stats = TierStats(self.name)
        self._num_refused = 0  # commands not sent because a breaker was open
        self._num_too_large = 0  # puts refused for exceeding max_value_bytes
        self._num_unconfirmed = 0  # deletes that left a tombstone (since start)
        self._unconfirmed_log = BurstLog(log)
        self._server = _ServerFigures()
        self._closed = False
        self._wait_ms = round(config.delete_wait_s * 1000)
        self._ensure_router()
        self._tombstones = Tombstones(config.tombstone_file, self._confirm_deletes,
                                      config.circuit_open_s)

    # -- keys and connection ------------------------------------------------------------

    def redis_key(self, key: ChunkKey) -> bytes:
        """The Redis key of a chunk: ``key_prefix + hex(key)``, readable in redis-cli."""
        return self._prefix + key.hex().encode()

    @property
    def mode(self) -> str:
        """"standalone", "sentinel" or "cluster"; "unknown" until Redis first answers."""
        return self._router.mode if self._router is not None else "unknown"

    def _ensure_router(self) -> Router | None:
        if self._router is not None or self._closed:
            return self._router
        if not self._connect_breaker.allow():
            return None
        with self._connect_lock:
            if self._router is not None:
                return self._router
            try:
                router = connect_router(self._options, self._config.topology_refresh_s)
            except (redis.RedisError, OSError) as exc:
                self._connect_breaker.record_failure()
                log.warning("redis tier: %s unreachable (%s); serving misses, retrying every "
                            "%.1f s", self._address.redacted(), exc, self._config.circuit_open_s)
                return None
            self._connect_breaker.record_success()
            self._router = router
            log.info("redis tier: connected to %s (%s)", self._address.redacted(), router.mode)
            return router

    # -- batched commands ----------------------------------------------------------------

    def _execute(self, rkeys: Sequence[bytes], add: AddCommand, per_key: int = 1,
                 confirm: bool = False) -> list[Any]:
        """Run ``per_key`` commands per key, pipelined per node; each key's slot gets its
        first command's reply, ``_FAILED`` where any failed or none came, and
        ``_WRONG_TYPE`` where the key holds a value of another type. With ``confirm``,
        each node's batch ends with a WAIT for its replicas, and a batch they did not
        acknowledge in ``delete_wait_s`` is ``_FAILED`` too."""
        results: list[Any] = [_FAILED] * len(rkeys)
        router = self._ensure_router()
        if router is None:
            self._count_refused(len(rkeys))
            return results
        pending = [(node, idx) for node, idx in router.route(rkeys)]
        self._count_refused(len(rkeys) - sum(len(idx) for _, idx in pending))
        for _ in range(2):  # the second round follows MOVED replies once
            moved: list[int] = []
            for node, idx in pending:
                moved += self._execute_on(router, node, idx, add, results, per_key, confirm)
            if not moved:
                break
            regrouped = router.route([rkeys[i] for i in moved])
            pending = [(node, [moved[j] for j in idx]) for node, idx in regrouped]
        return results

    def _execute_on(self, router: Router, node: RedisNode, idx: list[int], add: AddCommand,
                    results: list[Any], per_key: int, confirm: bool) -> list[int]:
        """Pipeline ``idx``'s commands to one node; returns the indices answered MOVED."""
        if not node.breaker.allow():
            self._count_refused(len(idx))
            router.note_failure(node)  # rate-limited: finds a promoted replica
            return []
        pipe = node.client.pipeline(transaction=False)
        for i in idx:
            add(pipe, i)
        confirm = confirm and self._wait_ms > 0
        try:
            if confirm:
                num_waited = self._queue_wait(node, pipe)
            replies = pipe.execute(raise_on_error=False)
        except redis.RedisError as exc:
            self._node_failed(router, node, exc)
            return []
        self._node_answered(node)
        if confirm and not self._replicas_acked(node, replies, num_waited):
            return []  # every slot stays _FAILED: a replica may still hold the keys
        moved: list[int] = []
        for n, i in enumerate(idx):
            group = replies[n * per_key : (n + 1) * per_key]
            reply = group[0]
            error = next((r for r in group if isinstance(r, Exception)), None)
            if isinstance(reply, redis.exceptions.MovedError):
                router.note_moved(reply.slot_id, reply.host, reply.port)
                moved.append(i)
            elif error is not None and str(error).startswith("WRONGTYPE"):
                results[i] = _WRONG_TYPE
            elif error is not None:
                log.debug("redis tier: command on %s failed: %s", node.name, error)
            else:
                results[i] = reply
        return moved

    def _queue_wait(self, node: RedisNode, pipe: Any) -> int:
        """After a node's writes, queue ROLE (the replicas connected now) and a WAIT for
        the replicas it had at its last ROLE; returns how many the WAIT waits for.

        WAIT must share the writes' connection (it waits for that connection's last
        write), hence one pipeline and the count from the previous ROLE; the first
        time, one ROLE round trip asks.
        """
        if node.num_replicas is None:
            try:
                node.num_replicas = _connected_replicas(node.client.execute_command("ROLE"))
            except redis.ResponseError:  # ROLE renamed away (managed Redis): no WAIT
                node.num_replicas = 0
        pipe.execute_command("ROLE")
        if node.num_replicas:
            pipe.execute_command("WAIT", node.num_replicas, self._wait_ms)
        return node.num_replicas

    def _replicas_acked(self, node: RedisNode, replies: list[Any], num_waited: int) -> bool:
        """Whether every replica connected at the delete applied it (pops ROLE, WAIT)."""
        acked = replies.pop() if num_waited else 0
        connected = _connected_replicas(replies.pop())
        node.num_replicas = connected
        if isinstance(acked, int) and acked >= connected:
            return True
        if isinstance(acked, redis.ResponseError):  # WAIT disabled (some managed Redis)
            log.warning("redis tier: %s refuses WAIT (%s); deletes are no longer confirmed "
                        "by replicas, only by masters", node.name, acked)
            self._wait_ms = 0
            return True
        log.debug("redis tier: %s replica(s) of %s acknowledged a delete, %d connected",
                  acked, node.name, connected)
        return False

    def _node_failed(self, router: Router, node: RedisNode, exc: Exception) -> None:
        was_open = node.breaker.is_open
        node.breaker.record_failure()
        if node.breaker.is_open and not was_open:
            log.warning("redis tier: node %s is failing (%s); circuit open, its keys are "
                        "misses until it answers", node.name, exc)
        else:
            log.debug("redis tier: node %s failed: %s", node.name, exc)
        if isinstance(exc, NODE_ERRORS):
            router.note_failure(node)

    def _node_answered(self, node: RedisNode) -> None:
        if node.breaker.is_open:
            log.warning("redis tier: node %s answers again; circuit closed", node.name)
        node.breaker.record_success()

    def _count_refused(self, n: int) -> None:
        if n:
            with self._lock:
                self._num_refused += n

    # -- the Tier protocol -----------------------------------------------------------------

    def get(self, key: ChunkKey) -> bytes | None:
        return self.get_many([key])[0]

    def get_many(self, keys: Sequence[ChunkKey]) -> list[bytes | None]:
        """Pipelined HMGETs; each value's key record and object are checked, and a
        corrupt value (or one of another type) is deleted and missed. A tombstoned key
        (deleted, not yet confirmed by Redis) is a miss without a call."""
        return self._unless_buried(keys, self._get_live, None)

    def _unless_buried(self, keys: Sequence[ChunkKey], read: Callable[[Any], list[Any]],
                       miss: Any) -> list[Any]:
        """``read(keys)``, with ``miss`` for tombstoned keys, which are not sent."""
        if not self._tombstones:
            return read(keys)
        buried = [k in self._tombstones for k in keys]
        if not any(buried):
            return read(keys)
        with self._lock:
            self._stats.misses += sum(buried)
        live = iter(read([k for k, b in zip(keys, buried, strict=True) if not b]))
        return [miss if b else next(live) for b in buried]

    def _get_live(self, keys: Sequence[ChunkKey]) -> list[bytes | None]:
        rkeys = [self.redis_key(k) for k in keys]
        replies = self._execute(
            rkeys, lambda pipe, i: pipe.hmget(rkeys[i], [_RECORD_FIELD, _OBJECT_FIELD]))
        out: list[bytes | None] = []
        corrupt: list[bytes] = []
        num_errors = read_bytes = 0
        for key, rkey, reply in zip(keys, rkeys, replies, strict=True):
            value = None
            if reply is _FAILED:
                num_errors += 1
            elif reply is _WRONG_TYPE:
                log.warning("redis tier: dropping value %s: not a kvstore hash (written "
                            "before key records, or by something else)", rkey.decode())
                corrupt.append(rkey)
            elif reply[1] is not None:
                record, obj = reply
                try:
                    check_record(record or b"", key, obj)
                    verify_object(obj)
                    value, read_bytes = obj, read_bytes + len(obj)
                except Corrupt as exc:
                    log.warning("redis tier: dropping corrupt value %s: %s", rkey.decode(), exc)
                    corrupt.append(rkey)
            out.append(value)
        if corrupt:
            self._execute(corrupt, lambda pipe, i: pipe.unlink(corrupt[i]))
        num_hits = sum(v is not None for v in out)
        with self._lock:
            s = self._stats
            s.hits += num_hits
            s.misses += len(keys) - num_hits
            s.errors += num_errors
            s.corrupt += len(corrupt)
            s.read_bytes += read_bytes
        return out

    def put(self, key: ChunkKey, obj: bytes) -> bool:
        return self.put_many([(key, obj)])[0]

    def put_many(self, items: Sequence[tuple[ChunkKey, bytes]]) -> list[bool]:
        """Pipelined HSETs of record and object (+ PEXPIRE when ttl_s is set); False
        where Redis did not take it. A key put again after a delete that Redis has not
        confirmed loses its tombstone once Redis takes the put."""
        if not self._tombstones or not any(k in self._tombstones for k, _ in items):
            return self._put_many(items)
        with self._tombstones.retry_lock:  # no retried delete of these keys runs meanwhile
            seen = self._tombstones.generations([k for k, _ in items])
            ok = self._put_many(items)
            self._tombstones.discard_many(
                (k, g) for (k, _), g, is_ok in zip(items, seen, ok, strict=True) if is_ok)
        return ok

    def _put_many(self, items: Sequence[tuple[ChunkKey, bytes]]) -> list[bool]:
        limit = self._config.max_value_bytes
        send = [i for i, (_, obj) in enumerate(items) if len(obj) <= limit]
        if len(send) < len(items):
            self._refuse_too_large([len(items[i][1]) for i in range(len(items)) if
                                    len(items[i][1]) > limit])
        rkeys = [self.redis_key(items[i][0]) for i in send]
        objs = [items[i][1] for i in send]
        records = [pack_record(items[i][0], items[i][1]) for i in send]
        ttl_ms = self._ttl_ms

        def add(pipe: Any, j: int) -> None:
            pipe.hset(rkeys[j], mapping={_RECORD_FIELD: records[j], _OBJECT_FIELD: objs[j]})
            if ttl_ms is not None:
                pipe.pexpire(rkeys[j], ttl_ms)

        per_key = 1 if ttl_ms is None else 2
        replies = self._execute(rkeys, add, per_key)
        wrong = [j for j, reply in enumerate(replies) if reply is _WRONG_TYPE]
        if wrong:  # plain values written before key records: replace them
            self._execute([rkeys[j] for j in wrong], lambda pipe, n: pipe.unlink(rkeys[wrong[n]]))
            retried = self._execute([rkeys[j] for j in wrong], lambda pipe, n: add(pipe, wrong[n]),
                                    per_key)
            for j, reply in zip(wrong, retried, strict=True):
                replies[j] = reply
        ok = [False] * len(items)
        written = 0
        for i, obj, reply in zip(send, objs, replies, strict=True):
            if reply is not _FAILED and reply is not _WRONG_TYPE:
                ok[i] = True
                written += len(obj)
        with self._lock:
            self._stats.puts += sum(ok)
            self._stats.written_bytes += written
            self._stats.errors += sum(r is _FAILED for r in replies)
        return ok

    def _refuse_too_large(self, sizes: list[int]) -> None:
        with self._lock:
            first = self._num_too_large == 0
            self._num_too_large += len(sizes)
        (log.warning if first else log.debug)(
            "redis tier: refusing %d object(s) of %s bytes: larger than tiers.redis."
            "max_value_bytes = %d; raise it (up to %d) or use smaller chunks",
            len(sizes), sizes[:4], self._config.max_value_bytes, REDIS_MAX_BULK_BYTES)

    def contains_many(self, keys: Sequence[ChunkKey]) -> list[bool]:
        """Pipelined EXISTS; an unreachable or tombstoned key counts as absent."""
        return self._unless_buried(keys, self._contains_live, False)

    def _contains_live(self, keys: Sequence[ChunkKey]) -> list[bool]:
        rkeys = [self.redis_key(k) for k in keys]
        replies = self._execute(rkeys, lambda pipe, i: pipe.exists(rkeys[i]))
        failed = sum(r is _FAILED for r in replies)
        if failed:
            with self._lock:
                self._stats.errors += failed
        return [r is not _FAILED and r > 0 for r in replies]

    def delete(self, key: ChunkKey) -> bool:
        """UNLINK (frees large values off Redis's main thread), confirmed by the
        replicas connected to the key's master (WAIT); True if a key was removed.

        A delete Redis does not confirm leaves a tombstone (False is returned): the
        key is a miss from now on, and the delete is retried until a master (the
        promoted replica, after a failover) confirms it.

        Raises:
            Unavailable: the tombstone could not be recorded (its log could not be
                written, or too many deletes are pending); the delete is not done.
        """
        seen = self._tombstones.generations([key])
        reply = self._delete_many([key])[0]
        if reply is _FAILED:
            self._tombstones.add_many([key])  # and retried from now on
            with self._lock:
                self._num_unconfirmed += 1
            self._unconfirmed_log.warning(
                "redis tier: a delete was not confirmed (master down, or its replicas did "
                "not acknowledge it); the key is a miss and the delete is retried every "
                "%.1f s", self._config.circuit_open_s)
            return False
        self._tombstones.discard_many(zip([key], seen, strict=True))
        return reply > 0

    def _delete_many(self, keys: Sequence[ChunkKey]) -> list[Any]:
        rkeys = [self.redis_key(k) for k in keys]
        return self._execute(rkeys, lambda pipe, i: pipe.unlink(rkeys[i]), confirm=True)

    def _confirm_deletes(self, keys: list[ChunkKey]) -> list[bool]:
        """The retried deletes: which ones Redis confirmed."""
        return [r is not _FAILED for r in self._delete_many(keys)]

    @property
    def tombstones(self) -> Tombstones:
        """Deletes not yet confirmed by Redis (their keys are misses meanwhile)."""
        return self._tombstones

    # -- health and stats ------------------------------------------------------------------

    @property
    def state(self) -> str:
        """"up", "degraded" (some cluster nodes refused by their breaker) or "down"."""
        router = self._router if not self._closed else None
        if router is None:
            return "down"
        nodes = router.nodes()
        num_open = sum(n.breaker.is_open for n in nodes)
        if not nodes or num_open == len(nodes):
            return "down"
        return "degraded" if num_open else "up"

    @property
    def is_up(self) -> bool:
        return self.state != "down"

    def breaker_states(self) -> dict[str, bool]:
        """Node name -> whether its circuit breaker is open (calls refused); {} unconnected."""
        router = self._router
        return {n.name: n.breaker.is_open for n in router.nodes()} if router else {}

    def stats(self) -> TierStats:
        self._ensure_router()  # lets a tier that started while Redis was down reconnect
        server = self._server_figures()
        with self._lock:
            snap = replace(self._stats, info={})
            refused, too_large = self._num_refused, self._num_too_large
            unconfirmed = self._num_unconfirmed
        snap.used_bytes, snap.capacity_bytes = server.used_bytes, server.capacity_bytes
        snap.num_objects, snap.evictions = server.num_objects, server.evictions
        router = self._router
        down = [n.name for n in router.nodes() if n.breaker.is_open] if router else []
        snap.info = {"mode": self.mode, "address": self._address.redacted(),
                     "state": self.state, "nodes_down": ",".join(down),
                     "tombstones": str(len(self._tombstones)),
                     "deletes_unconfirmed": str(unconfirmed),
                     "circuit_refused": str(refused), "refused_too_large": str(too_large)}
        return snap

    def _server_figures(self) -> _ServerFigures:
        """INFO memory/stats and DBSIZE summed over reachable masters, cached."""
        router, now = self._router, time.monotonic()
        if router is None or now - self._server.taken_at < self._config.stats_cache_s:
            return self._server
        fig = _ServerFigures(taken_at=now)
        for node in router.nodes():
            if not node.breaker.allow():
                continue
            try:
                pipe = node.client.pipeline(transaction=False)
                pipe.info("memory")
                pipe.info("stats")
                pipe.dbsize()
                memory, stats, size = pipe.execute()
            except redis.RedisError as exc:
                self._node_failed(router, node, exc)
                continue
            self._node_answered(node)
            fig.used_bytes += int(memory.get("used_memory", 0))
            fig.capacity_bytes += int(memory.get("maxmemory", 0))
            fig.evictions += int(stats.get("evicted_keys", 0))
            fig.num_objects += int(size)
        self._server = fig
        return fig

    def close(self) -> None:
        self._closed = True
        self._tombstones.close()
        router, self._router = self._router, None
        if router is not None:
            router.close()
