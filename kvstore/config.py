"""One typed configuration tree, loaded from TOML and overridden by CLI flags (DESIGN §9).

`KVSTORE_CONFIG` (a TOML path) is the only environment variable kvstore reads, and
only here. Every field is documented where declared, with its unit and default.
Components receive their own slice (``config.tiers.disk``), never the whole tree.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import platformdirs

from kvstore.errors import InvalidArgument

CONFIG_ENV = "KVSTORE_CONFIG"
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": KiB, "mib": MiB, "gib": GiB, "tib": 1 << 40}


def parse_bytes(value: int | str) -> int:
    """``4096``, ``"512MiB"``, ``"2 GB"`` -> bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise InvalidArgument(f"a byte size must be >= 0, got {value}")
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            return int(float(m.group(1)) * _UNITS[(m.group(2) or "B").lower()])
    raise InvalidArgument(f"cannot read {value!r} as a byte size (try 4096 or \"512MiB\")")


def default_data_dir() -> str:
    """Disk tier directory under the user's cache dir, e.g. ~/.cache/kvstore/disk."""
    return str(Path(platformdirs.user_cache_dir("kvstore")) / "disk")


@dataclass(slots=True)
class ServerConfig:
    listen: str = "127.0.0.1:50051"  # HOST:PORT to bind; port 0 picks a free port
    # Bind a non-loopback address without TLS (anyone on the path reads the KV and the
    # bearer tokens). Without it a non-loopback bind needs tls_cert_file/tls_key_file.
    allow_insecure_remote: bool = False
    max_message_bytes: int = 64 * MiB  # largest gRPC message in either direction
    # Most token ids one request may carry (Lookup, Put, Get, ...); more is refused
    # with INVALID_ARGUMENT before anything is hashed. Default 4,194,304 (16 MiB of ids).
    max_request_tokens: int = 1 << 22
    # Most chunk keys one request may address (tokens / chunk_tokens): each costs a
    # hash and a lookup, so a tiny chunk_tokens cannot make one call hash for seconds.
    # More is refused with INVALID_ARGUMENT. Default 65,536 (16M tokens at 256 a chunk).
    max_request_chunks: int = 1 << 16
    tls_cert_file: str | None = None  # PEM certificate; with tls_key_file turns TLS on
    tls_key_file: str | None = None  # PEM private key of tls_cert_file
    # PEM CA bundle of client certificates: set = mutual TLS, a client without a
    # certificate signed by it cannot connect. Needs TLS. Unset = no client certificates.
    tls_client_ca_file: str | None = None
    tokens: dict[str, str] = field(default_factory=dict)  # bearer token -> tenant; {} = no auth
    drain_timeout_s: float = 10.0  # on SIGTERM, wait this long for in-flight calls
    # On SIGTERM, report NOT_SERVING on the health service this long while still serving,
    # so load balancers stop routing here before the drain refuses new calls. Default 1.0.
    drain_notice_s: float = 1.0
    io_threads: int = 4  # threads doing tier I/O off the event loop
    metrics_listen: str | None = None  # HOST:PORT for Prometheus metrics; None = off
    # Serve same-host clients references into the DRAM arena (AttachArena, LeaseChunks)
    # so their reads skip the socket; false = every client gets the streamed path.
    same_host: bool = True
    # With tokens configured, also hand arena references to tenants. The arena holds
    # every tenant's chunks and a client that maps it can read all of them, so the
    # default (false) gives tenants the streamed path only (docs/design.md §5).
    arena_for_tenants: bool = False


@dataclass(slots=True)
class CpuTierConfig:
    capacity_bytes: int = 2 * GiB  # DRAM held by the tier; LRU evicts beyond it
    # Directory of the shared-memory arena file the tier lives in (a tmpfs such as
    # /dev/shm, so same-host clients can map it); falls back to /tmp if missing.
    shm_dir: str = "/dev/shm"
    # Seconds a same-host client's lease pins its chunks unless released first; a
    # client that dies holding a lease pins nothing for longer than this. Default 30.
    lease_ttl_s: float = 30.0
    # Back the arena with huge pages: a hugetlbfs file under /dev/hugepages when it
    # is mounted and has free pages, else transparent huge pages (madvise) where the
    # kernel allows them for shmem, else normal pages. Default false.
    hugepages: bool = False


@dataclass(slots=True)
class DiskTierConfig:
    enabled: bool = True  # false runs DRAM only
    path: str = field(default_factory=default_data_dir)  # directory of object files
    capacity_bytes: int = 20 * GiB  # bytes of object files; LRU evicts beyond it
    fsync: bool = True  # fsync each object and its directory (crash-safe)
    # File I/O backend: "auto" = kvikio (GPUDirect Storage, or its compat mode) when
    # kvikio and CUDA are available, else POSIX; "posix" forces plain os.read/write;
    # "kvikio" requires kvikio and fails start-up without it. Default "auto".
    io: str = "auto"

    def __post_init__(self) -> None:
        if self.io not in ("auto", "posix", "kvikio"):
            raise InvalidArgument(f"tiers.disk.io must be 'auto', 'posix' or 'kvikio', "
                                  f"got {self.io!r}")


@dataclass(slots=True)
class RedisTierConfig:
    # redis://[user:pass@]host:port[/db] (a cluster node is detected and used as a seed),
    # rediss:// (TLS), redis+cluster://h1:p1,h2:p2 (seeds), redis+sentinel://h1:p1,h2:p2/
    # master_name[/db]; None = tier off
    url: str | None = None
    key_prefix: str = "kvs:"  # prefix of every key kvstore writes; no "{" or "}" (hash tags)
    ttl_s: float | None = None  # expiry of written chunks; None = no TTL (rely on LRU)
    timeout_s: float = 0.5  # socket connect and read timeout per Redis call; a timeout is a miss
    # Larger objects are refused: put returns False and logs why. At most 512 MiB, Redis's
    # default proto-max-bulk-len; keep values far below it, big values stall a Redis node.
    max_value_bytes: int = 256 * MiB
    write_through: bool = True  # write every put to Redis as well
    circuit_failures: int = 2  # consecutive errors on one node that open its circuit breaker
    circuit_open_s: float = 1.0  # an open breaker refuses calls this long, then lets one probe
    topology_refresh_s: float = 1.0  # cluster: at most one slot-map refresh per this interval
    stats_cache_s: float = 1.0  # seconds the server-side figures in stats() are reused
    # Seconds a delete waits (WAIT) for the replicas connected to the key's master to
    # apply it; a delete they do not confirm in time, like one sent while the master is
    # down, is kept as a tombstone: a miss, retried until a master confirms it, so a
    # failover cannot bring it back. 0 = no WAIT (only unreachable masters leave one).
    delete_wait_s: float = 0.1
    # Log of deletes Redis has not confirmed yet, kept across restarts; unset =
    # redis-tombstones.log in tiers.disk.path when the disk tier is on, else in memory only.
    tombstone_file: str | None = None


@dataclass(slots=True)
class GpuTierConfig:
    # HBM the GPU tier may hold (one device allocation made at start-up); 0 = no GPU
    # tier. Needs torch, cupy and a CUDA device; without them the daemon logs why and
    # runs without the tier. Default 0.
    capacity_bytes: int = 0
    device: int = 0  # CUDA device index of the tier. Default 0.
    # Gets of a chunk (any path) after which the engine copies it into HBM; 0 = place
    # every put there too. A LeaseGpuChunks request promotes what it asks for at once.
    promote_after_hits: int = 2
    # Seconds a same-host client's GPU lease pins its chunks unless released first.
    lease_ttl_s: float = 30.0

    def __post_init__(self) -> None:
        if self.promote_after_hits < 0 or self.lease_ttl_s <= 0:
            raise InvalidArgument(f"tiers.gpu needs promote_after_hits >= 0 and lease_ttl_s > 0, "
                                  f"got {self.promote_after_hits} and {self.lease_ttl_s}")


@dataclass(slots=True)
class TiersConfig:
    gpu: GpuTierConfig = field(default_factory=GpuTierConfig)
    cpu: CpuTierConfig = field(default_factory=CpuTierConfig)
    disk: DiskTierConfig = field(default_factory=DiskTierConfig)
    redis: RedisTierConfig = field(default_factory=RedisTierConfig)


@dataclass(slots=True)
class EngineConfig:
    write_policy: str = "write-back"  # "write-back": DRAM now, disk later; or "write-through"
    flush_interval_s: float = 1.0  # write-back: dirty chunks reach disk within this time

    def __post_init__(self) -> None:
        if self.write_policy not in ("write-back", "write-through"):
            raise InvalidArgument(
                f"engine.write_policy must be 'write-back' or 'write-through', got "
                f"{self.write_policy!r}"
            )


@dataclass(slots=True)
class TenantsConfig:
    # Tenant -> byte quota of the objects it stores (chunks and blobs, each counted once
    # whatever tiers hold it); a tenant not named here has no quota. Default {}.
    quota_bytes: dict[str, int] = field(default_factory=dict)
    # What a put over its tenant's quota does: "refuse" (RESOURCE_EXHAUSTED) or "evict"
    # (drop that tenant's own oldest objects until it fits; never another tenant's).
    over_quota: str = "refuse"

    def __post_init__(self) -> None:
        if self.over_quota not in ("refuse", "evict"):
            raise InvalidArgument(f"tenants.over_quota must be 'refuse' or 'evict', got "
                                  f"{self.over_quota!r}")


@dataclass(slots=True)
class LogConfig:
    level: str = "INFO"  # DEBUG, INFO, WARNING or ERROR
    # "text": one key=value line per event; "json": one JSON object per line. Default text.
    format: str = "text"

    def __post_init__(self) -> None:
        if self.format not in ("text", "json"):
            raise InvalidArgument(f"log.format must be 'text' or 'json', got {self.format!r}")
        if self.level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise InvalidArgument(f"log.level must be DEBUG, INFO, WARNING or ERROR, got "
                                  f"{self.level!r}")


@dataclass(slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    tiers: TiersConfig = field(default_factory=TiersConfig)
    tenants: TenantsConfig = field(default_factory=TenantsConfig)
    log: LogConfig = field(default_factory=LogConfig)


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One thing wrong with a configuration."""

    key: str  # dotted key it is about, e.g. "server.listen"
    message: str  # what was expected and what was seen
    line: int | None = None  # 1-based line of the key in the TOML file; None if not from it

    def __str__(self) -> str:
        where = f"line {self.line}: " if self.line is not None else ""
        message = self.message
        if message.startswith(self.key + " "):  # "x.y must be ..." already names the key
            return f"{where}{message}"
        return f"{where}{self.key}: {message}"


def _build(cls: type, data: Any, where: str, problems: list[ConfigProblem]) -> Any:
    """Instantiate a config dataclass from a dict; every bad key is added to ``problems``
    (and left at its default), so one pass reports every error of a file."""
    if not isinstance(data, dict):
        problems.append(ConfigProblem(where, f"must be a table, got {type(data).__name__}"))
        return cls()
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{where}.{key}" if where else key
        if key not in fields:
            problems.append(ConfigProblem(dotted, f"unknown config key; known in "
                                          f"[{where or 'top level'}]: {sorted(fields)}"))
            continue
        ftype = str(fields[key].type)
        sub = globals().get(ftype)
        try:
            if isinstance(sub, type) and dataclasses.is_dataclass(sub):
                kwargs[key] = _build(sub, value, dotted, problems)
            else:
                kwargs[key] = _check_value(key, value, ftype, dotted)
        except InvalidArgument as exc:
            problems.append(ConfigProblem(dotted, str(exc)))
    while True:
        try:
            return cls(**kwargs)
        except InvalidArgument as exc:  # a __post_init__ check: attribute it to its key
            named = [k for k in kwargs if f"{where}.{k}" in str(exc)] or list(kwargs)
            if not named:
                raise  # the defaults themselves are invalid: a bug, not a config error
            problems.append(ConfigProblem(f"{where}.{named[0]}".strip("."), str(exc)))
            del kwargs[named[0]]


def _check_value(key: str, value: Any, ftype: str, where: str) -> Any:
    if ftype.startswith("dict"):
        if not isinstance(value, dict):
            raise InvalidArgument(f"must be a table, got {value!r}")
        is_bytes = key.endswith("_bytes")
        out: dict[str, Any] = {}
        for k, v in value.items():
            if is_bytes:
                out[k] = parse_bytes(v)
            elif not isinstance(v, str):
                raise InvalidArgument(f"[{k!r}] must be a string, got {v!r}")
            else:
                out[k] = v
        return out
    if key.endswith("_bytes") and value is not None:
        return parse_bytes(value)
    return _check_type(value, ftype, where)


def _check_type(value: Any, ftype: str, where: str) -> Any:
    if value is None and "None" in ftype:
        return None
    if ftype.startswith("float") and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    expected = {"int": int, "bool": bool, "str": str, "dict": dict}
    for name, typ in expected.items():
        if ftype.startswith(name):
            if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
                raise InvalidArgument(f"{where} must be {name}, got {value!r}")
            return value
    return value


def read_config(path: str | os.PathLike[str] | None = None,
                overrides: dict[str, Any] | None = None
                ) -> tuple[Config, list[ConfigProblem], str]:
    """Like ``load_config`` but returns every problem instead of raising on the first.

    Returns:
        (config with bad keys left at their defaults, problems, the TOML text read).

    Raises:
        InvalidArgument: the file cannot be read or is not TOML at all.
    """
    path = path or os.environ.get(CONFIG_ENV) or None
    data: dict[str, Any] = {}
    text = ""
    if path is not None:
        try:
            text = Path(path).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidArgument(f"cannot read config file {path}: {exc}") from exc
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise InvalidArgument(f"config file {path} is not valid TOML: {exc}") from exc
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    problems: list[ConfigProblem] = []
    config = _build(Config, data, "", problems)
    lines = key_lines(text)
    return config, [_with_line(p, lines) for p in problems], text


def _with_line(problem: ConfigProblem, lines: dict[str, int]) -> ConfigProblem:
    key = problem.key
    while key and key not in lines:  # a value inside an inline table: its parent's line
        key = key.rpartition(".")[0]
    return dataclasses.replace(problem, line=lines.get(key))


_TABLE_RE = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY_RE = re.compile(r"^\s*((?:[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*')"
                     r"(?:\s*\.\s*(?:[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*'))*)\s*=")


def key_lines(text: str) -> dict[str, int]:
    """Dotted key (and table) -> the 1-based line defining it in a TOML text.

    A line scanner, not a parser: enough to point an error at its line. Keys inside
    inline tables and multi-line values are not located (their parent key is).
    """
    found: dict[str, int] = {}
    table = ""
    for number, line in enumerate(text.splitlines(), start=1):
        m = _TABLE_RE.match(line)
        if m:
            table = _dotted(m.group(1))
            found.setdefault(table, number)
            continue
        m = _KEY_RE.match(line)
        if m:
            key = _dotted(m.group(1))
            found.setdefault(f"{table}.{key}" if table else key, number)
    return found


def _dotted(raw: str) -> str:
    parts = re.findall(r"\"[^\"]*\"|'[^']*'|[^.\s]+", raw)
    return ".".join(p.strip("\"'") for p in parts)


def load_config(path: str | os.PathLike[str] | None = None,
                overrides: dict[str, Any] | None = None) -> Config:
    """Read the TOML at ``path`` (else $KVSTORE_CONFIG, else defaults), then apply overrides.

    ``overrides`` maps dotted keys to values, e.g. ``{"server.listen": "0.0.0.0:1"}``.

    Raises:
        InvalidArgument: naming every bad key (``kvstore config check FILE`` adds lines).
    """
    config, problems, _ = read_config(path, overrides)
    if problems:
        raise InvalidArgument("bad configuration: " + "; ".join(map(str, problems)))
    return config
