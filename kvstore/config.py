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
    allow_remote: bool = False  # must be true to bind anything but a loopback address
    max_message_bytes: int = 64 * MiB  # largest gRPC message in either direction
    tls_cert_file: str | None = None  # PEM certificate; with tls_key_file turns TLS on
    tls_key_file: str | None = None  # PEM private key
    tokens: dict[str, str] = field(default_factory=dict)  # bearer token -> tenant; {} = no auth
    drain_timeout_s: float = 10.0  # on SIGTERM, wait this long for in-flight calls
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
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    tiers: TiersConfig = field(default_factory=TiersConfig)


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    """Instantiate a config dataclass from a dict, refusing unknown keys and bad types."""
    if not isinstance(data, dict):
        raise InvalidArgument(f"[{where}] must be a table, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            raise InvalidArgument(f"unknown config key {where}.{key}; known: {sorted(fields)}")
        ftype = str(fields[key].type)
        sub = globals().get(ftype)
        if sub is not None and dataclasses.is_dataclass(sub):
            kwargs[key] = _build(sub, value, f"{where}.{key}")
        elif key.endswith("_bytes") and value is not None:
            kwargs[key] = parse_bytes(value)
        else:
            kwargs[key] = _check_type(value, ftype, f"{where}.{key}")
    return cls(**kwargs)


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


def load_config(path: str | os.PathLike[str] | None = None,
                overrides: dict[str, Any] | None = None) -> Config:
    """Read the TOML at ``path`` (else $KVSTORE_CONFIG, else defaults), then apply overrides.

    ``overrides`` maps dotted keys to values, e.g. ``{"server.listen": "0.0.0.0:1"}``.
    """
    path = path or os.environ.get(CONFIG_ENV) or None
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except OSError as exc:
            raise InvalidArgument(f"cannot read config file {path}: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise InvalidArgument(f"config file {path} is not valid TOML: {exc}") from exc
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return _build(Config, data, "config")
