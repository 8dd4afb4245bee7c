"""The soak's fault injectors: each does one thing to a real process, file or Redis value.

Every injector returns a small dict of what it did (for the summary). Corruption
targets the victim slots' chunks by key (their disk file and Redis value, computed
with ``kvstore.keys``), so the lost-write count of the other slots stays exact.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import redis
from _procs import RedisClusterProcs, RedisProcess, info_field

log = logging.getLogger(__name__)
_FAILOVER_TIMEOUT_S = 15.0


def victim_keys(spec: Any, num_clients: int) -> list[str]:
    """Hex chunk keys of every client's victim slots."""
    from _soak_client import slot_tokens

    from kvstore.keys import Namespace, key_hex, prefix_keys

    ns = Namespace(spec.namespace, spec.layout())
    keys = []
    for client_id in range(num_clients):
        for slot in range(spec.num_slots - spec.num_victim_slots, spec.num_slots):
            keys += [key_hex(k) for k in prefix_keys(ns, slot_tokens(spec, client_id, slot))]
    return keys


MODES = ("bit_flipped", "truncated", "swapped")  # what a corruption fault does to an object


def _mutate(data: bytes, how: str, rng: random.Random) -> bytes:
    if how == "truncated":
        return data[: rng.randrange(len(data))]
    pos = rng.randrange(len(data))
    return data[:pos] + bytes([data[pos] ^ (1 << rng.randrange(8))]) + data[pos + 1:]


def _plan(names: list, modes: tuple[str, ...], count: int) -> list[tuple[Any, str, Any]]:
    """(target, how, source) for up to ``count`` targets; a swap copies a spare's object."""
    targets, spares = names[:count], names[count:]
    plan = []
    for i, target in enumerate(targets):
        how = modes[i % len(modes)]
        if how == "swapped" and not spares:
            how = "truncated"
        plan.append((target, how, spares.pop() if how == "swapped" else None))
    return plan


def corrupt_disk_files(disk_dir: Path, keys: list[str], rng: random.Random,
                       modes: tuple[str, ...] = MODES, count: int = 12) -> dict[str, int]:
    """Flip a bit in, truncate, or copy another victim's valid file over victim files."""
    files = [p for k in keys if (p := disk_dir / k[:2] / f"{k}.kvc").exists()]
    done = {"files_on_disk": len(files), **{m: 0 for m in modes}}
    rng.shuffle(files)
    for path, how, source in _plan(files, modes, count):
        try:
            if how == "swapped":
                shutil.copyfile(source, path)  # a valid object of another chunk
            else:
                path.write_bytes(_mutate(path.read_bytes(), how, rng))
        except OSError:
            continue  # the daemon evicted or rewrote it meanwhile
        done[how] = done.get(how, 0) + 1
    return done


def corrupt_redis_values(cluster: RedisClusterProcs, keys: list[str], prefix: str,
                         rng: random.Random, modes: tuple[str, ...] = MODES,
                         count: int = 12) -> dict[str, int]:
    """Flip a bit in, truncate, or swap victim values in the Redis Cluster."""
    done = {"values_found": 0, **{m: 0 for m in modes}}
    seed = next(m for m in cluster.masters + cluster.replicas if m.is_running())
    rc = redis.RedisCluster(host="127.0.0.1", port=seed.port, socket_timeout=2)
    try:
        values = {}
        for k in rng.sample(keys, min(len(keys), count * 3)):
            try:
                if v := rc.get(prefix + k):
                    values[k] = v
            except redis.RedisError:
                pass
        done["values_found"] = len(values)
        for key, how, source in _plan(list(values), modes, count):
            new = values[source] if how == "swapped" else _mutate(values[key], how, rng)
            try:
                rc.set(prefix + key, new)
                done[how] = done.get(how, 0) + 1
            except redis.RedisError:
                pass
    finally:
        rc.close()
    return done


def _role(node: RedisProcess) -> str | None:
    try:
        return node.client().execute_command("ROLE")[0].decode()
    except (redis.RedisError, OSError):
        return None


def _wait(predicate: Any, timeout_s: float = _FAILOVER_TIMEOUT_S) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def _cluster_ok(nodes: list[RedisProcess]) -> bool:
    try:
        return all(info_field(n.client().execute_command("CLUSTER INFO"), "cluster_state")
                   == "ok" for n in nodes if n.is_running())
    except (redis.RedisError, OSError):
        return False


def kill_master_with_replica(cluster: RedisClusterProcs, pair: int,
                             down_s: float) -> dict[str, Any]:
    """kill -9 a master; its replica takes over; the old master comes back as a replica."""
    master, replica = cluster.masters[pair], cluster.replicas[pair]
    start = time.monotonic()
    master.kill()
    promoted = _wait(lambda: _role(replica) == "master")
    failover_s = time.monotonic() - start
    time.sleep(max(0.0, down_s - failover_s))
    master.start()
    rejoined = _wait(lambda: _role(master) == "slave" and _cluster_ok(cluster.masters
                                                                      + cluster.replicas))
    return {"replica_promoted": promoted, "failover_s": round(failover_s, 2),
            "old_master_rejoined_as_replica": rejoined}


def kill_master_without_replica(cluster: RedisClusterProcs, pair: int,
                                down_s: float) -> dict[str, Any]:
    """kill -9 a replica, then its master: a third of the slots has no node for ``down_s``."""
    master, replica = cluster.masters[pair], cluster.replicas[pair]
    replica.kill()
    time.sleep(1.0)
    master.kill()
    time.sleep(down_s)
    master.start()
    replica.start()
    back = _wait(lambda: _cluster_ok(cluster.masters + cluster.replicas))
    return {"slots_uncovered_s": down_s, "cluster_ok_after_restart": back}


def fill_disk(disk_dir: Path) -> tuple[Path, int]:
    """Write a filler file until the filesystem is full; returns it and its size."""
    filler = disk_dir / "soak-filler"
    block, written = b"\0" * (1 << 20), 0
    with open(filler, "wb", buffering=0) as fh:
        while True:
            try:
                written += fh.write(block)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
    for size in (64 << 10, 4096):  # the last partial blocks
        try:
            with open(filler, "ab", buffering=0) as fh:
                while True:
                    written += fh.write(b"\0" * size)
        except OSError:
            pass
    return filler, written


def leaser_main(spec: Any, num_sequences: int, ready: Any) -> None:
    """A client that puts sequences, leases them in the arena, says so and waits to be killed."""
    from _soak_client import kv_for, slot_tokens

    from kvstore.client import Client

    leases = []
    with Client(spec.address, spec.namespace, spec.layout(), transport="arena",
                timeout_s=spec.timeout_s) as client:
        for slot in range(num_sequences):
            tokens = slot_tokens(spec, 10_000, slot)  # a client id no worker uses
            client.put(tokens, kv_for(spec, tokens))
            leases.append(client.lease(tokens, ttl_s=None))
        ready.put(sum(len(lease.extents) for lease in leases))
        time.sleep(3600)


def kill_process(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
