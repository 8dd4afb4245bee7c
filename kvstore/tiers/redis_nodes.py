"""Redis addresses and key routing: which server holds a key (standalone, Sentinel, Cluster).

The tier talks to each server through its own plain redis-py client and circuit
breaker, so one dead cluster shard costs misses on its slots only and is not
called again until it answers. Cluster routing is done here from ``CLUSTER SLOTS``
rather than by redis-py's RedisCluster, whose pipelines fail (and retry with
backoff) as a whole when one shard is down.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import redis
import redis.sentinel
from redis.backoff import NoBackoff
from redis.connection import Encoder, PythonRespSerializer
from redis.crc import key_slot
from redis.retry import Retry

from kvstore.errors import InvalidArgument
from kvstore.tiers.circuit import CircuitBreaker

log = logging.getLogger(__name__)

NUM_SLOTS = 16384
_SCHEMES = {  # scheme -> (kind, tls)
    "redis": ("auto", False), "rediss": ("auto", True),
    "redis+cluster": ("cluster", False), "rediss+cluster": ("cluster", True),
    "redis+sentinel": ("sentinel", False), "rediss+sentinel": ("sentinel", True),
}
# Errors that mean "this server did not answer": they feed its circuit breaker.
NODE_ERRORS = (redis.ConnectionError, redis.TimeoutError, OSError)

# redis-py packs commands with hiredis when it is installed, and hiredis copies every
# value into one freshly grown buffer: up to 380-460 us per 256 KiB value and 10-12 ms
# per 5.9 MB one here (0.5-0.7 GB/s; bench/bench_micro.py), against 2 us for redis-py's own
# Python packer, which hands values over 6000 bytes to the socket as they are.
# The reply parser stays hiredis.
_PACKER = PythonRespSerializer(6000, Encoder("utf-8", "strict", False).encode)
_IOV_MAX = 1024  # buffers per sendmsg call (Linux's IOV_MAX)


def use_zero_copy_packer(client: redis.Redis) -> redis.Redis:
    """Make ``client``'s connections send large values without copying them, and a
    pipeline's buffers in one ``sendmsg`` on plain TCP (see VectoredConnection)."""
    pool = client.connection_pool
    pool.connection_kwargs["command_packer"] = _PACKER
    if pool.connection_class is redis.Connection:  # TLS sockets have no sendmsg
        pool.connection_class = VectoredConnection
    return client


class VectoredConnection(redis.Connection):
    """redis-py's TCP connection, sending a packed pipeline with ``sendmsg``.

    redis-py sends a pipeline's buffers (small commands joined, each large value on
    its own) with one ``sendall`` per buffer; a pipeline of 16 SETs of 256 KiB is 33
    syscalls, each waiting for socket-buffer room on its own; here they go out in as
    few ``sendmsg`` calls as the socket buffer allows (``python bench/bench_micro.py``,
    rows "redis_pipeline_send", compares the two).
    """

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        if isinstance(command, list) and len(command) > 1:
            # redis-py iterates the command inside its error handling (timeouts and
            # socket errors disconnect and raise redis errors): send it all there.
            command = _SendAllOnIteration(self, command)
        super().send_packed_command(command, check_health)


@dataclass(frozen=True, slots=True)
class _SendAllOnIteration:
    conn: VectoredConnection
    buffers: list[bytes | memoryview]

    def __iter__(self) -> Any:
        sendmsg_all(self.conn._sock, self.buffers)
        return iter(())


def sendmsg_all(sock: Any, buffers: Sequence[bytes | memoryview]) -> None:
    """Send every buffer in order with as few ``sendmsg`` calls as the kernel allows."""
    views = [memoryview(b).cast("B") for b in buffers]
    first = 0
    while first < len(views):
        sent = sock.sendmsg(views[first : first + _IOV_MAX])
        while sent:
            size = len(views[first])
            if sent < size:
                views[first] = views[first][sent:]
                break
            sent -= size
            first += 1


@dataclass(frozen=True, slots=True)
class RedisAddress:
    """A parsed ``tiers.redis.url``."""

    kind: str  # "auto" (standalone, or a cluster node found by INFO), "cluster", "sentinel"
    hosts: tuple[tuple[str, int], ...]  # (host, port) of the server, seeds or sentinels
    tls: bool = False  # rediss:// schemes
    username: str | None = None
    password: str | None = None
    db: int = 0  # standalone and Sentinel only; a cluster has db 0 alone
    service: str | None = None  # Sentinel master name

    def redacted(self) -> str:
        """The address without credentials, for logs and stats."""
        hosts = ",".join(f"{h}:{p}" for h, p in self.hosts)
        return f"{self.kind}{'+tls' if self.tls else ''}://{hosts}/{self.service or self.db}"


def parse_redis_url(url: str) -> RedisAddress:
    """Parse redis://, rediss://, redis+cluster:// and redis+sentinel:// addresses.

    Raises:
        InvalidArgument: the scheme, a host:port or the db is malformed.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in _SCHEMES:
        raise InvalidArgument(f"tiers.redis.url {url!r}: scheme must be one of {sorted(_SCHEMES)}")
    kind, tls = _SCHEMES[scheme.lower()]
    netloc, _, path = rest.partition("/")
    username = password = None
    if "@" in netloc:
        userinfo, netloc = netloc.rsplit("@", 1)
        user, _, pw = userinfo.partition(":")
        username, password = (user or None), (pw or None)
    hosts = tuple(_parse_host(h, url) for h in netloc.split(",") if h)
    if not hosts:
        raise InvalidArgument(f"tiers.redis.url {url!r} names no host")
    if kind == "auto" and len(hosts) > 1:
        kind = "cluster"  # a list of nodes can only be cluster seeds
    parts = [p for p in path.split("/") if p]
    service = parts.pop(0) if kind == "sentinel" and parts else None
    if kind == "sentinel" and service is None:
        raise InvalidArgument(f"tiers.redis.url {url!r}: Sentinel needs /master_name after hosts")
    try:
        db = int(parts[0]) if parts else 0
    except ValueError:
        raise InvalidArgument(f"tiers.redis.url {url!r}: db {parts[0]!r} is not a number") from None
    return RedisAddress(kind, hosts, tls, username, password, db, service)


def _parse_host(text: str, url: str) -> tuple[str, int]:
    host, port = text, "6379"
    if text.startswith("["):  # [ipv6]:port
        host, _, tail = text[1:].partition("]")
        port = tail[1:] if tail.startswith(":") else port
    elif ":" in text:
        host, port = text.rsplit(":", 1)
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgument(f"tiers.redis.url {url!r}: bad host:port {text!r}")
    return host, int(port)


@dataclass(slots=True)
class RedisNode:
    """One server the tier sends commands to, with its own breaker."""

    name: str  # "host:port", or "sentinel:<master>"
    client: redis.Redis
    breaker: CircuitBreaker
    # Replicas connected to this master when it last answered ROLE (a delete WAITs for
    # them); None until asked.
    num_replicas: int | None = None


@dataclass(slots=True)
class NodeOptions:
    """How every per-server client is built."""

    address: RedisAddress
    timeout_s: float  # connect and read timeout
    circuit_failures: int
    circuit_open_s: float

    def client_kwargs(self) -> dict:
        # One immediate retry for a stale pooled connection (server restarted); no
        # retry on timeouts: a slow node must cost one timeout, not several.
        retry = Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,))
        kwargs = dict(socket_timeout=self.timeout_s, socket_connect_timeout=self.timeout_s,
                      retry=retry, username=self.address.username,
                      password=self.address.password, ssl=self.address.tls)
        return kwargs

    def node(self, host: str, port: int, db: int = 0) -> RedisNode:
        client = use_zero_copy_packer(redis.Redis(host=host, port=port, db=db,
                                                  **self.client_kwargs()))
        return RedisNode(f"{host}:{port}", client, self.breaker())

    def breaker(self) -> CircuitBreaker:
        return CircuitBreaker(self.circuit_failures, self.circuit_open_s)


class Router:
    """Maps keys to the servers holding them."""

    mode = "standalone"

    def route(self, keys: Sequence[bytes]) -> list[tuple[RedisNode, list[int]]]:
        """Group key indices by the node that holds them."""
        raise NotImplementedError

    def nodes(self) -> list[RedisNode]:
        """Every server currently holding slots (masters)."""
        raise NotImplementedError

    def note_failure(self, node: RedisNode) -> None:
        """A node did not answer: the topology may have changed."""

    def note_moved(self, slot: int, host: str, port: int) -> None:
        """A node answered MOVED: the slot now lives elsewhere."""

    def close(self) -> None:
        for node in self.nodes():
            node.client.close()


class SingleRouter(Router):
    """Standalone server, or the master a Sentinel client follows through failovers."""

    def __init__(self, node: RedisNode, mode: str) -> None:
        self.node = node
        self.mode = mode

    def route(self, keys: Sequence[bytes]) -> list[tuple[RedisNode, list[int]]]:
        return [(self.node, list(range(len(keys))))] if keys else []

    def nodes(self) -> list[RedisNode]:
        return [self.node]


@dataclass(slots=True)
class _SlotMap:
    owners: list[str | None] = field(default_factory=lambda: [None] * NUM_SLOTS)


class ClusterRouter(Router):
    """Slot map from ``CLUSTER SLOTS``; refreshed when a node fails or answers MOVED."""

    mode = "cluster"

    def __init__(self, options: NodeOptions, seeds: Sequence[tuple[str, int]],
                 refresh_s: float) -> None:
        self._options = options
        self._seeds = list(seeds)
        self._refresh_s = refresh_s
        self._nodes: dict[str, RedisNode] = {}
        self._slots = _SlotMap()
        self._lock = threading.Lock()
        self._last_refresh = float("-inf")

    def _node(self, host: str, port: int) -> RedisNode:
        name = f"{host}:{port}"
        with self._lock:
            if name not in self._nodes:
                self._nodes[name] = self._options.node(host, port)
            return self._nodes[name]

    def route(self, keys: Sequence[bytes]) -> list[tuple[RedisNode, list[int]]]:
        groups: dict[str, list[int]] = {}
        owners = self._slots.owners
        for i, key in enumerate(keys):
            name = owners[key_slot(key)]
            if name is not None:
                groups.setdefault(name, []).append(i)
        return [(self._nodes[name], idx) for name, idx in groups.items()]

    def nodes(self) -> list[RedisNode]:
        owners = {name for name in self._slots.owners if name is not None}
        return [self._nodes[name] for name in sorted(owners)]

    def note_failure(self, node: RedisNode) -> None:
        self.refresh()

    def note_moved(self, slot: int, host: str, port: int) -> None:
        node = self._node(host, port)
        self._slots.owners[slot] = node.name
        self.refresh()

    def refresh(self, *, force: bool = False) -> bool:
        """Reload the slot map from the first node that answers; rate-limited."""
        with self._lock:
            now = time.monotonic()
            if not force and now - self._last_refresh < self._refresh_s:
                return False
            self._last_refresh = now
            known = sorted(self._nodes.values(), key=lambda n: n.breaker.is_open)
        seeds = [self._node(h, p) for h, p in self._seeds]
        candidates = [n for n in known + seeds if not n.breaker.is_open] or seeds
        for node in dict.fromkeys(n.name for n in candidates):
            if self._load_slots(self._nodes[node]):
                return True
        log.warning("cluster slot map refresh failed: no node of %s answered",
                    [n.name for n in candidates])
        return False

    def _load_slots(self, node: RedisNode) -> bool:
        try:
            reply = node.client.execute_command("CLUSTER SLOTS")
        except redis.RedisError as exc:
            log.debug("CLUSTER SLOTS on %s failed: %s", node.name, exc)
            if isinstance(exc, NODE_ERRORS):
                node.breaker.record_failure()
            return False
        owners: list[str | None] = [None] * NUM_SLOTS
        for entry in reply:
            start, end, master = int(entry[0]), int(entry[1]), entry[2]
            host = master[0].decode() if isinstance(master[0], bytes) else master[0]
            host = host or node.name.rsplit(":", 1)[0]  # "" means "the node you asked"
            owner = self._node(host, int(master[1])).name
            owners[start : end + 1] = [owner] * (end - start + 1)
        self._slots.owners = owners  # one reference swap: readers see old or new map
        return True


def connect_router(options: NodeOptions, refresh_s: float) -> Router:
    """Build the router for an address, detecting cluster mode on a redis:// node.

    Raises:
        redis.RedisError: the server (or every seed) did not answer.
    """
    address = options.address
    if address.kind == "sentinel":
        return _sentinel_router(options)
    if address.kind == "cluster":
        router = ClusterRouter(options, address.hosts, refresh_s)
        if not router.refresh(force=True):
            raise redis.ConnectionError(f"no cluster seed of {address.redacted()} answered")
        return router
    host, port = address.hosts[0]
    node = options.node(host, port, address.db)
    try:
        cluster_enabled = node.client.info("cluster").get("cluster_enabled") == 1
    except redis.ResponseError:  # INFO renamed or disabled on a managed server
        cluster_enabled = False
    if not cluster_enabled:
        return SingleRouter(node, "standalone")
    node.client.close()
    router = ClusterRouter(options, address.hosts, refresh_s)
    if not router.refresh(force=True):
        raise redis.ConnectionError(f"cluster node {host}:{port} did not list its slots")
    return router


def _sentinel_router(options: NodeOptions) -> Router:
    address = options.address
    kwargs = options.client_kwargs()
    sentinel = redis.sentinel.Sentinel(
        list(address.hosts), socket_timeout=options.timeout_s,
        sentinel_kwargs={"socket_timeout": options.timeout_s,
                         "socket_connect_timeout": options.timeout_s},
    )
    client = use_zero_copy_packer(sentinel.master_for(address.service, db=address.db,
                                                      **kwargs))
    client.ping()
    node = RedisNode(f"sentinel:{address.service}", client, options.breaker())
    return SingleRouter(node, "sentinel")
