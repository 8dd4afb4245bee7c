"""KVStoreHiCache against SGLang's real HiCacheStorage, storage factory and MHA host pool."""

from __future__ import annotations

import hashlib
import importlib.util
import signal
import sys

import pytest
import torch


def _stub_torchvision() -> None:
    """SGLang's host pool imports its model configs, one of which imports torchvision.

    The torchvision wheel on PyPI needs CUDA libraries (its ops fail to register with
    the CPU torch), and nothing on the storage path uses it, so a bare module stands
    in when torchvision is absent. transformers is asked first, so it caches
    "no torchvision" and never reaches for the stub's (missing) functions.
    """
    if importlib.util.find_spec("torchvision") is not None:
        return
    import enum
    import types
    from importlib.machinery import ModuleSpec

    from transformers.utils.import_utils import is_torchvision_available

    is_torchvision_available()
    modules = {}
    for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional"):
        modules[name] = types.ModuleType(name)
        modules[name].__spec__ = ModuleSpec(name, None)
    mode = enum.Enum("InterpolationMode", {"NEAREST": "nearest", "BILINEAR": "bilinear",
                                           "BICUBIC": "bicubic"})
    modules["torchvision.transforms.functional"].InterpolationMode = mode
    modules["torchvision.transforms"].InterpolationMode = mode
    modules["torchvision.transforms"].functional = modules["torchvision.transforms.functional"]
    modules["torchvision"].transforms = modules["torchvision.transforms"]
    sys.modules.update(modules)


try:  # the engine's own classes; without them there is nothing to test against
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig

    _stub_torchvision()
    from sglang.srt.mem_cache.device_pool_info import KVBufferLayout, KVBuffers, MHABufferInfo
    from sglang.srt.mem_cache.pool_host.base import host_memory_budget_scope
    from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost
    from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory
except ImportError as exc:  # pragma: no cover - depends on the [engines] extra
    pytest.skip(f"sglang is not importable ({exc}); pip install -e '.[engines]' and "
                "sglang --no-deps (README)", allow_module_level=True)

from kvstore.integrations.sglang import KVStoreHiCache, page_tokens  # noqa: E402 - after the engine import guard
from tests.integrations._daemon import DaemonProcess  # noqa: E402 - after the engine import guard
from tests.redis_servers import free_port  # noqa: E402 - after the engine import guard

LAYERS, HEADS, DIM, PAGE, DEVICE_TOKENS = 3, 2, 16, 8, 64


def make_pool(layout: str) -> MHATokenToKVPoolHost:
    """SGLang's real MHA host pool, built over CPU "device" buffers."""
    k = tuple(torch.zeros(DEVICE_TOKENS + PAGE, HEADS, DIM, dtype=torch.float16)
              for _ in range(LAYERS))
    v = tuple(torch.zeros(DEVICE_TOKENS + PAGE, HEADS, DIM, dtype=torch.float16)
              for _ in range(LAYERS))

    def pointers(ts):
        return torch.tensor([t.data_ptr() for t in ts], dtype=torch.uint64)

    info = MHABufferInfo(
        buffers=KVBuffers(k=k, v=v, k_data_ptrs=pointers(k), v_data_ptrs=pointers(v),
                          layout=KVBufferLayout.NHD),
        page_size=PAGE, head_num=HEADS, head_dim=DIM, v_head_dim=DIM, dtype=torch.float16,
        device=torch.device("cpu"))
    # SGLang books host pools against free memory less a fixed reserve; on a small test
    # machine that is negative, so give the pool its own budget, as SGLang's launcher does.
    with host_memory_budget_scope(64 << 20):
        return MHATokenToKVPoolHost(info, 2.0, 0, PAGE, layout, pin_memory=False,
                                    device="cpu", device_capacity_tokens=DEVICE_TOKENS,
                                    start_layer=0, end_layer=LAYERS)


def make_backend(address: str, pool: MHATokenToKVPoolHost, tp_rank: int = 0,
                 **extra: object) -> HiCacheStorage:
    """Built the way SGLang builds a dynamic backend, then given its host pool."""
    config = HiCacheStorageConfig(
        tp_rank=tp_rank, tp_size=2, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1,
        is_mla_model=False, enable_storage_metrics=False,
        is_page_first_layout=pool.layout == "page_first", model_name="org/tiny-llama",
        extra_config={"backend_name": "kvstore", "module_path": "kvstore.integrations.sglang",
                      "class_name": "KVStoreHiCache", "interface_v1": 1, "address": address,
                      "timeout_s": 5.0, **extra})
    backend = StorageBackendFactory.create_backend("dynamic", config, pool)
    backend.register_mem_pool_host(pool)
    return backend


def page_keys(num_pages: int, salt: str) -> list[str]:
    """SGLang-shaped keys: a SHA-256 hex chain."""
    keys, parent = [], salt.encode()
    for i in range(num_pages):
        parent = hashlib.sha256(parent + i.to_bytes(4, "little")).digest()
        keys.append(parent.hex())
    return keys


def fill_pages(pool: MHATokenToKVPoolHost, num_pages: int, seed: int) -> torch.Tensor:
    """Allocate pages out of order, fill them with random KV; returns their token slots."""
    slots = pool.alloc(num_pages * PAGE).view(num_pages, PAGE).flip(0).reshape(-1)
    gen = torch.Generator().manual_seed(seed)
    pool.kv_buffer.copy_(torch.randn(pool.kv_buffer.shape, generator=gen).half())
    return slots


def canonical_pages(backend: KVStoreHiCache, slots: torch.Tensor) -> list[torch.Tensor]:
    return [backend._page(int(s)).clone() for s in slots.view(-1, PAGE)[:, 0]]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    running = DaemonProcess(tmp_path_factory.mktemp("sglang-daemon"), free_port())
    yield running
    running.stop()


@pytest.mark.parametrize("layout", ["layer_first", "page_first"])
def test_batch_set_v1_then_batch_get_v1_into_another_pool_is_bit_exact(daemon, layout):
    source, target = make_pool(layout), make_pool(layout)
    writer, reader = make_backend(daemon.address, source), make_backend(daemon.address, target)
    assert isinstance(writer, KVStoreHiCache) and isinstance(writer, HiCacheStorage)
    keys = page_keys(5, salt=layout)
    slots = fill_pages(source, 5, seed=1)
    assert writer.batch_set_v1(keys, slots) == [True] * 5
    target_slots = target.alloc(5 * PAGE)
    assert reader.batch_exists(keys) == 5
    assert reader.batch_get_v1(keys, target_slots) == [True] * 5
    assert reader.get_stats()["pages_in_place"] == 5  # same host: read in place from the arena
    for want, got in zip(canonical_pages(writer, slots), canonical_pages(reader, target_slots),
                         strict=True):
        assert got.numpy().tobytes() == want.numpy().tobytes()
    # The pool's own page reader sees the same bytes (its layout, not ours).
    for s, t in zip(slots.view(-1, PAGE)[:, 0], target_slots.view(-1, PAGE)[:, 0], strict=True):
        assert torch.equal(target.get_data_page(int(t)), source.get_data_page(int(s)))


@pytest.mark.parametrize("layout", ["layer_first", "page_first"])
def test_a_page_corrupt_in_the_arena_never_loads_wrong_bytes(server, layout):
    source = make_pool(layout)
    writer = make_backend(server.address, source)
    keys = page_keys(3, salt=f"corrupt-{layout}")
    slots = fill_pages(source, 3, seed=8)
    want = canonical_pages(writer, slots)
    assert all(writer.batch_set_v1(keys, slots))
    with writer._client.lease(page_tokens(keys[1], PAGE), position_free=True) as lease:
        extent = lease.extents[0]
    server.engine.dram._arena._view[extent.offset + extent.length - 3] ^= 0x01
    for transport in ("auto", "stream"):
        reader = make_backend(server.address, make_pool(layout), transport=transport)
        target_slots = reader.mem_pool_host.alloc(3 * PAGE)
        got = reader.batch_get_v1(keys, target_slots)
        # Page 1 is read again through the daemon's Get, which drops the bad DRAM copy
        # and serves the disk tier's copy if the write-back reached it, else a miss.
        assert got in ([True, True, True], [True, False, False]), got
        pages = canonical_pages(reader, target_slots)
        for i in range(got.count(True)):
            assert torch.equal(pages[i], want[i])  # never a wrong byte
        stats = reader.get_stats()
        # In place: every page got but the corrupt one (streamed after its check failed).
        in_place = got.count(True) - got[1] if transport == "auto" else 0
        assert (stats["pages_in_place"], stats["failures"]) == (in_place, transport == "auto")
    assert server.engine.dram.stats().info["leases"] == "0"


def test_pages_are_shared_between_host_layouts(daemon):
    source, target = make_pool("layer_first"), make_pool("page_first")
    writer, reader = make_backend(daemon.address, source), make_backend(daemon.address, target)
    keys = page_keys(3, salt="shared")
    slots = fill_pages(source, 3, seed=2)
    assert all(writer.batch_set_v1(keys, slots))
    target_slots = target.alloc(3 * PAGE)
    assert reader.batch_get_v1(keys, target_slots) == [True] * 3
    assert all(torch.equal(a, b) for a, b in zip(canonical_pages(writer, slots),
                                                  canonical_pages(reader, target_slots),
                                                  strict=True))


def test_batch_exists_counts_only_the_leading_run(daemon):
    pool = make_pool("layer_first")
    backend = make_backend(daemon.address, pool)
    keys = page_keys(5, salt="run")
    slots = fill_pages(pool, 5, seed=3)
    stored = [0, 1, 2, 4]
    assert all(backend.batch_set_v1([keys[i] for i in stored],
                                    slots.view(5, PAGE)[stored].reshape(-1)))
    assert backend.batch_exists(keys) == 3
    got = backend.batch_get_v1(keys, make_pool("layer_first").alloc(5 * PAGE))
    assert got == [True, True, True, False, False]  # loads stop at the first miss


def test_tensor_parallel_ranks_do_not_share_pages(daemon):
    pool = make_pool("layer_first")
    rank0, rank1 = make_backend(daemon.address, pool), make_backend(daemon.address, pool, 1)
    keys = page_keys(2, salt="tp")
    assert all(rank0.batch_set_v1(keys, fill_pages(pool, 2, seed=4)))
    assert rank0.batch_exists(keys) == 2 and rank1.batch_exists(keys) == 0


def test_tensor_api_round_trips_flat_pages(daemon):
    pool = make_pool("page_first")
    backend = make_backend(daemon.address, pool)
    slots = fill_pages(pool, 2, seed=5)
    pages = [pool.get_data_page(int(s)).clone() for s in slots.view(2, PAGE)[:, 0]]
    keys = page_keys(2, salt="tensor")
    assert backend.batch_set(keys, pages)
    got = backend.batch_get(keys, [pool.get_dummy_flat_data_page() for _ in keys])
    assert all(torch.equal(g, p) for g, p in zip(got, pages, strict=True))
    assert backend.get(page_keys(1, salt="absent")[0]) is None
    assert backend.get_stats()["pages_set"] == 2


def test_batch_exists_after_daemon_restart_still_finds_pages(daemon):
    pool = make_pool("page_first")
    backend = make_backend(daemon.address, pool)
    keys = page_keys(4, salt="restart")
    slots = fill_pages(pool, 4, seed=6)
    want = canonical_pages(backend, slots)
    assert all(backend.batch_set_v1(keys, slots))
    daemon.stop(signal.SIGTERM)  # drains: DRAM chunks reach the disk tier
    daemon.start()
    reader = make_backend(daemon.address, make_pool("layer_first"))
    assert reader.batch_exists(keys) == 4
    target_slots = reader.mem_pool_host.alloc(4 * PAGE)
    assert reader.batch_get_v1(keys, target_slots) == [True] * 4
    assert all(torch.equal(a, b) for a, b in zip(want, canonical_pages(reader, target_slots),
                                                  strict=True))


def test_dead_daemon_is_a_miss_not_an_error(daemon):
    pool = make_pool("layer_first")
    backend = make_backend(daemon.address, pool)
    keys = page_keys(2, salt="dead")
    slots = fill_pages(pool, 2, seed=7)
    daemon.stop()
    try:
        assert backend.batch_exists(keys) == 0
        assert backend.batch_set_v1(keys, slots) == [False, False]
        assert backend.batch_get_v1(keys, slots) == [False, False]
        assert backend.get_stats()["failures"] >= 3
    finally:
        daemon.start()


def test_small_pages_are_refused_with_the_flag_to_change(daemon):
    with pytest.raises(Exception, match="--page-size >= 8"):
        backend = KVStoreHiCache(None, {"address": daemon.address, "namespace": "m"})
        pool = make_pool("layer_first")
        pool.page_size = 4
        backend.register_mem_pool_host(pool)
