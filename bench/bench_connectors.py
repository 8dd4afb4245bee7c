"""vLLM connector: load an N-token prefix into paged blocks vs Client.get vs a plain copy.

For each model shape and prefix length N, with the prefix stored in a daemon on
this host (arena transport, as in a vLLM pod):

- ``copy_s``: one torch copy of the same bytes (canonical -> canonical), the floor;
- ``get_s``: ``Client.get(tokens)`` of the prefix (same bytes, one new contiguous tensor);
- ``get_out_s``: ``Client.get(tokens, out=buffer)`` into a buffer allocated once (on
  this host: one copy out of the arena, nothing allocated);
- ``connector_s``: the worker-side connector's load of tokens [0, N) into shuffled
  paged blocks ([blocks, heads, 16, 2 * dim]): start_load_kv, wait_for_layer_load
  per layer, wait_for_save; on this host it reads the chunks in place
  (``in_place`` says whether it did); ``connector_over_get`` = connector_s / get_s,
  ``connector_over_get_out`` = connector_s / get_out_s.

Then the scheduler-side lookup of a stored prompt, each time a new request (so a
real daemon Lookup): ``on_new_request`` then ``get_num_new_matched_tokens``, asked
again after 0.5 ms while it answers None. ``call`` is the time one call holds
the scheduler, ``blocked`` the scheduler's time inside the connector per request
(all its calls), ``answer`` the time from arrival to the answer; the baseline is a plain ``Client.lookup`` of the same prompt, interleaved.
The GPU part (paged blocks on the device: load and save GB/s) runs only with CUDA.

    python bench/bench_connectors.py --shapes smollm2,llama3-8b \
        --tokens 1024,4096,16384,32768 --repeat 3
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import daemon, emit  # noqa: E402

from kvstore.client import Client  # noqa: E402
from kvstore.integrations._vllm_worker import LoadSpec, SaveSpec, Worker  # noqa: E402
from kvstore.layout import KVLayout  # noqa: E402

SHAPES = {  # per TP rank: layers, KV heads, head dim (float16)
    "smollm2": (30, 3, 64),
    "llama3-8b": (32, 8, 128),
}
BLOCK_SIZE, CHUNK_TOKENS = 16, 256


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _best_interleaved(fns: dict, repeat: int) -> dict[str, float]:
    """Best seconds of each, repetitions interleaved so machine load hits all alike."""
    for fn in fns.values():
        fn()  # warm-up
    best = {name: float("inf") for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            best[name] = min(best[name], _timed(fn))
    return best


def _paged(layout: KVLayout, num_blocks: int, device: str) -> dict[str, torch.Tensor]:
    return {f"layer.{i}": torch.zeros(num_blocks, layout.num_kv_heads, BLOCK_SIZE,
                                      2 * layout.head_dim, dtype=torch.float16, device=device)
            for i in range(layout.num_layers)}


def _namespace(layout: KVLayout) -> str:
    return f"bench-connectors-{layout.num_layers}x{layout.num_kv_heads}x{layout.head_dim}"


def _worker(address: str, layout: KVLayout, paged: dict[str, torch.Tensor]) -> Worker:
    names = list(paged)
    worker = Worker(layout, names, BLOCK_SIZE,
                    lambda: Client(address, _namespace(layout), layout, timeout_s=120), 120.0)
    worker.register(paged)
    return worker


def _load(worker: Worker, spec: LoadSpec) -> None:
    """One step of the worker-side connector: the calls vLLM makes around a forward."""
    worker.start_step([spec], [])
    for name in worker._layer_names:
        worker.wait_for_layer(name)
    worker.end_step()
    assert not worker.take_load_errors()


def _bench_load(address: str, name: str, layout: KVLayout, num_tokens: int,
                repeat: int) -> None:
    tokens = np.random.default_rng(num_tokens).integers(0, 50_000, num_tokens).astype(np.int32)
    kv = torch.randn(layout.shape(num_tokens), dtype=torch.float32).half()
    num_blocks = num_tokens // BLOCK_SIZE + 1
    block_ids = [int(b) for b in np.random.default_rng(0).permutation(num_blocks)[:-1]]
    spec = LoadSpec("r", tokens, block_ids, 0, num_tokens)
    with Client(address, _namespace(layout), layout, timeout_s=120) as client:
        client.put(tokens, kv)
        dst, out = torch.empty_like(kv), torch.empty_like(kv)
        paged = _paged(layout, num_blocks, "cpu")
        worker = _worker(address, layout, paged)
        try:
            best = _best_interleaved({
                "copy_s": lambda: dst.copy_(kv),
                "get_s": lambda: client.get(tokens),
                "get_out_s": lambda: client.get(tokens, out=out),
                "connector_s": lambda: _load(worker, spec),
            }, repeat)
            in_place = worker.num_loads_streamed == 0
        finally:
            worker.close()
        assert torch.equal(out, kv)
        got = torch.stack([paged[f"layer.{i}"][block_ids[0], :, :, :layout.head_dim]
                           for i in range(layout.num_layers)])
        assert torch.equal(got, kv[:, 0, :, :BLOCK_SIZE])  # the load really landed
        client.delete(tokens)
    gb = kv.numel() * 2 / 1e9
    emit("connectors", "load", shape=name, tokens=num_tokens, gb=round(gb, 3),
         **{k: round(v, 5) for k, v in best.items()},
         in_place=in_place,
         connector_over_get=round(best["connector_s"] / best["get_s"], 3),
         connector_over_get_out=round(best["connector_s"] / best["get_out_s"], 3),
         connector_gb_s=round(gb / best["connector_s"], 2),
         get_gb_s=round(gb / best["get_s"], 2), copy_gb_s=round(gb / best["copy_s"], 2))


def _bench_lookup(address: str, num_calls: int) -> None:
    try:
        from vllm.sampling_params import SamplingParams
        from vllm.v1.request import Request

        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.integrations._vllm_engine import make_connector
    except ImportError as exc:
        emit("connectors", "lookup", skipped=True,
             reason=f"vllm not importable ({exc}): scheduler-side lookup NOT measured")
        return
    extra = {"address": address, "namespace": "bench", "chunk_tokens": 32}
    scheduler = make_connector(extra, "SCHEDULER")
    prompt = list(range(2048))
    with Client(address, scheduler.namespace, scheduler.layout) as client:
        kv = torch.zeros(scheduler.layout.shape(2048), dtype=torch.float16)
        client.put(prompt, kv)
    samples: dict[str, list[float]] = {"blocked": [], "call": [], "answer": [], "client": []}
    nones = 0
    with Client(address, scheduler.namespace, scheduler.layout) as client:
        for i in range(num_calls + 20):
            request = Request(f"r{i}", prompt, SamplingParams(max_tokens=1), None)
            start = time.perf_counter()
            scheduler.on_new_request(request)  # back to back: nothing of the lookup is hidden
            blocked = time.perf_counter() - start
            while True:
                ask = time.perf_counter()
                answer = scheduler.get_num_new_matched_tokens(request, 0)
                blocked += time.perf_counter() - ask
                if i >= 20:
                    samples["call"].append((time.perf_counter() - ask) * 1000)
                if answer[0] is not None:
                    break
                nones += i >= 20
                time.sleep(0.0005)  # vLLM would ask again next step
            elapsed = time.perf_counter() - start
            assert answer[0] == 2032, answer
            scheduler.request_finished(request, [])
            start = time.perf_counter()  # the same Lookup straight through Client
            assert client.lookup(prompt) == 2048
            plain = time.perf_counter() - start
            if i >= 20:  # warm-up
                for name, value in (("blocked", blocked), ("answer", elapsed),
                                    ("client", plain)):
                    samples[name].append(value * 1000)
    scheduler.shutdown()

    def pct(name: str, q: int) -> float:
        return round(float(np.percentile(samples[name], q)), 3)

    emit("connectors", "lookup", calls=num_calls, prompt_tokens=2048,
         blocked_p50_ms=pct("blocked", 50), blocked_p99_ms=pct("blocked", 99),
         call_p50_ms=pct("call", 50), call_p99_ms=pct("call", 99),
         answer_p50_ms=pct("answer", 50), answer_p99_ms=pct("answer", 99),
         client_lookup_p50_ms=pct("client", 50), client_lookup_p99_ms=pct("client", 99),
         num_none_answers=nones)


def _bench_gpu(address: str, repeat: int) -> None:
    if not torch.cuda.is_available():
        emit("connectors", "gpu", skipped=True,
             reason="no CUDA device: load/save GB/s from device KV blocks NOT measured")
        return
    layout = KVLayout(*SHAPES["llama3-8b"], dtype="float16", chunk_tokens=CHUNK_TOKENS)
    num_tokens = 8192
    tokens = np.arange(num_tokens, dtype=np.int32) + 7
    num_blocks = num_tokens // BLOCK_SIZE + 1
    block_ids = [int(b) for b in np.random.default_rng(0).permutation(num_blocks)[:-1]]
    paged = _paged(layout, num_blocks, "cuda")
    for t in paged.values():
        t.normal_()
    worker = _worker(address, layout, paged)
    gb = layout.chunk_bytes * (num_tokens // CHUNK_TOKENS) / 1e9
    with Client(address, _namespace(layout), layout, timeout_s=120) as client:
        def save() -> None:
            client.delete(tokens)
            worker.start_step([], [SaveSpec("s", tokens, block_ids)])
            for name, t in paged.items():
                worker.save_layer(name, t)
            worker.end_step()
            assert worker.flush(120)
        save_s = _best_interleaved({"save": save}, repeat)["save"]
        spec = LoadSpec("r", tokens, block_ids, 0, num_tokens)
        load_s = _best_interleaved({"load": lambda: (_load(worker, spec),
                                                     torch.cuda.synchronize())}, repeat)["load"]
    worker.close()
    emit("connectors", "gpu", device=torch.cuda.get_device_name(), tokens=num_tokens,
         gb=round(gb, 3), save_gb_s=round(gb / save_s, 2), load_gb_s=round(gb / load_s, 2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="smollm2,llama3-8b")
    parser.add_argument("--tokens", default="1024,4096,16384,32768",
                        help="prefix lengths; llama3-8b stops at --max-gb")
    parser.add_argument("--max-gb", type=float, default=1.2,
                        help="skip sizes whose KV exceeds this (memory of a 24 GiB box)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--lookups", type=int, default=500)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CI)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.shapes, args.tokens, args.repeat, args.lookups = "smollm2", "512", 1, 20
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "kvstore.toml"
        config.write_text(f"[tiers.cpu]\ncapacity_bytes = {int(args.max_gb * 2.2e9)}\n")
        with daemon(Path(tmp) / "data", "--config", str(config)) as address:
            for name in args.shapes.split(","):
                for num_tokens in (int(t) for t in args.tokens.split(",")):
                    layout = KVLayout(*SHAPES[name], dtype="float16",
                                      chunk_tokens=CHUNK_TOKENS)
                    gb = layout.chunk_bytes * num_tokens / CHUNK_TOKENS / 1e9
                    if gb > args.max_gb:
                        emit("connectors", "load", shape=name, tokens=num_tokens,
                             skipped=True, reason=f"{gb:.1f} GB > --max-gb {args.max_gb}")
                        continue
                    _bench_load(address, name, layout, num_tokens, args.repeat)
            _bench_lookup(address, args.lookups)
            _bench_gpu(address, args.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
