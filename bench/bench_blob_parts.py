"""Blobs over the message limit: put_blob/get_blob in parts against one whole-blob message.

A random blob attached to a 32K-token prompt is put, then read back, through
``Client.put_blob``/``get_blob`` by a client with the default 64 MiB message
limit, with parts of at most 8 MiB (the default) and of up to the message limit.
The baseline, measured in the same run on the same daemon, is the same bytes as one
PutBlob and one GetBlob with the client's limit raised to hold them whole. Each
blob size gets a fresh daemon in its own process (1 GiB message limit, 1.5 GiB DRAM
tier); rounds visit every mode in turn, so background work (write-back to the disk
tier) falls on all alike, and the best round of each is reported.

    python bench/bench_blob_parts.py                # 24, 192 and 576 MB blobs
    python bench/bench_blob_parts.py --sizes-mb 192 --parts-mib 1,2,4,8,16,32,64
    python bench/bench_blob_parts.py --smoke        # tiny, for CI
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import daemon, emit  # noqa: E402

from kvstore.client import Client  # noqa: E402
from kvstore.client._blobs import part_size  # noqa: E402
from kvstore.client._protocol import PART_HEADROOM_BYTES  # noqa: E402
from kvstore.layout import KVLayout  # noqa: E402

LAYOUT = KVLayout(num_layers=30, num_kv_heads=3, head_dim=64, dtype="float16",
                  chunk_tokens=256, keys_pre_rope=True)
TOKENS = list(range(32_768))  # a 32K-token prompt: 128 KiB of tokens in every PutBlob
CLIENT_LIMIT_BYTES = 64 << 20  # the client's default
DAEMON_LIMIT_BYTES = 1 << 30
Mode = tuple[Callable[[], object], Callable[[], object]]  # (put, get)


def _modes(stack: ExitStack, address: str, data: bytes,
           parts: list[int]) -> tuple[dict[str, Mode], dict[str, int]]:
    """name -> (put, get) for the whole-blob baseline and each part size; and part bytes."""
    whole_bytes = len(data) + (1 << 20) + 4 * len(TOKENS)
    whole = stack.enter_context(Client(address, "bench", LAYOUT, timeout_s=300,
                                       max_message_bytes=whole_bytes,
                                       max_blob_part_bytes=whole_bytes))
    modes: dict[str, Mode] = {"whole": (lambda: whole.put_blob(TOKENS, "whole", data),
                                        lambda: whole.get_blob(TOKENS, "whole"))}
    part_bytes = {}
    for max_part in parts:
        parted = stack.enter_context(Client(address, "bench", LAYOUT, timeout_s=300,
                                            max_message_bytes=CLIENT_LIMIT_BYTES,
                                            max_blob_part_bytes=max_part))
        kind = f"parted-{max_part}"
        modes[kind] = (lambda c=parted, k=kind: c.put_blob(TOKENS, k, data),
                       lambda c=parted, k=kind: c.get_blob(TOKENS, k))
        part_bytes[kind] = part_size(CLIENT_LIMIT_BYTES - PART_HEADROOM_BYTES, len(TOKENS),
                                     max_part)
    return modes, part_bytes


def bench(address: str, num_bytes: int, parts: list[int], repeat: int) -> None:
    data = np.random.default_rng(0).integers(0, 256, num_bytes, dtype=np.uint8).tobytes()
    with ExitStack() as stack:
        modes, part_bytes = _modes(stack, address, data, parts)
        best = {name: [float("inf"), float("inf")] for name in modes}
        for round_index in range(repeat + 1):  # round 0 warms up
            for name, (put, get) in modes.items():
                start = time.perf_counter()
                put()
                put_s = time.perf_counter() - start
                got = get()
                get_s = time.perf_counter() - start - put_s
                assert got == data
                if round_index:
                    best[name] = [min(best[name][0], put_s), min(best[name][1], get_s)]
    whole_put, whole_get = best.pop("whole")
    for name, (put_s, get_s) in best.items():
        size = part_bytes[name]
        emit("blob_parts", "put_get", blob_bytes=num_bytes, part_bytes=size,
             num_parts=1 if num_bytes <= size else -(-num_bytes // size),
             put_ms=round(put_s * 1e3, 1), get_ms=round(get_s * 1e3, 1),
             whole_put_ms=round(whole_put * 1e3, 1), whole_get_ms=round(whole_get * 1e3, 1),
             put_vs_whole=round(put_s / whole_put, 2), get_vs_whole=round(get_s / whole_get, 2),
             get_mb_s=round(num_bytes / get_s / 1e6))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat")
    parser.add_argument("--sizes-mb", default="24,192,576", help="blob sizes, MB")
    parser.add_argument("--parts-mib", default="8,64", help="largest parts, MiB")
    parser.add_argument("--repeat", type=int, default=3, help="timed rounds")
    args = parser.parse_args()
    sizes = [300_000] if args.smoke else [int(s) * 10**6 for s in args.sizes_mb.split(",")]
    parts = [int(m) << 20 for m in args.parts_mib.split(",")]
    for size in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            config = Path(tmp) / "kvstore.toml"
            config.write_text(f"[server]\nmax_message_bytes = {DAEMON_LIMIT_BYTES}\n"
                              f"[tiers.cpu]\ncapacity_bytes = {3 << 29}\n")
            with daemon(Path(tmp) / "data", "--config", str(config)) as address:
                bench(address, size, parts, 1 if args.smoke else args.repeat)


if __name__ == "__main__":
    main()
