"""SGLang HiCache storage backend: SGLang's host KV pages stored in kvstore.

Load it with::

    --enable-hierarchical-cache --page-size 64 --hicache-storage-backend dynamic
    --hicache-storage-backend-extra-config '{"backend_name":"kvstore",
      "module_path":"kvstore.integrations.sglang","class_name":"KVStoreHiCache",
      "interface_v1":1,"address":"127.0.0.1:50051"}'

Decisions (docs/design.md, "Engine connectors"):

- SGLang hands the backend page keys, never token ids: a page key is a hash
  chain over the page's tokens and every page before it, so it names the whole
  prefix and is already stable across processes. Each page is one kvstore
  position-free chunk whose "tokens" are derived from the key
  (``page_tokens``); the namespace adds the model, TP size and rank, PP stage.
- A page is stored in kvstore's canonical order ``[layers, 2, heads, page, dim]``
  whatever the host pool's layout, so ``layer_first`` and ``page_first`` servers
  share pages (SGLang's own backends store layout-specific bytes).
- On the daemon's host ``batch_get_v1`` reads each page in place (``Client.view``:
  a lease-pinned view of the daemon's arena) and copies it layer by layer
  straight into the host pool, hashing each layer right before it is copied; a
  page that fails its checksum is read again through the daemon's Get, which
  verifies it and serves an intact lower-tier copy or a miss. Elsewhere, and for
  compressed pages, it streams.
- Misses and failures are results here, as SGLang expects: a failed get is
  False for that page and every later one (SGLang uses only the leading run); a
  dead daemon makes ``batch_exists`` answer 0, so SGLang recomputes.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import numpy as np
import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig

from kvstore.client import Client
from kvstore.errors import Corrupt, InvalidArgument, NotFound, PermissionDenied
from kvstore.integrations._paged import DTYPE_NAMES, storage_view
from kvstore.layout import KVLayout

log = logging.getLogger(__name__)

# Host pool layouts: where a page's tokens sit in kv_buffer, and the permutation of
# a page's slice (kv_buffer[:, :, s:e] or kv_buffer[:, s:e]) to [layers, 2, heads, page, dim].
_LAYOUTS = {
    "layer_first": (2, (1, 0, 3, 2, 4)),  # [2, layers, slots, heads, dim]
    "page_first": (1, (2, 0, 3, 1, 4)),  # [2, slots, layers, heads, dim]
}
_MIN_PAGE_SIZE = 8  # a page key's 256 bits need 8 int32 "tokens"


def page_tokens(key: str, page_size: int) -> np.ndarray:
    """The position-free chunk "tokens" naming SGLang page ``key``: SHA-256 words, 0-padded."""
    words = np.frombuffer(hashlib.sha256(b"sglang-page:" + key.encode()).digest(), dtype="<i4")
    tokens = np.zeros(page_size, dtype="<i4")
    tokens[:8] = words
    return tokens


def namespace_of(config: HiCacheStorageConfig | None, extra: dict[str, Any]) -> str:
    """The namespace name: model, TP size and PP stage (the TP rank goes in tp_rank)."""
    model = extra.get("namespace") or (config.model_name if config else None)
    if not model:
        raise InvalidArgument("KVStoreHiCache needs a model name: SGLang's model_name or "
                              "extra_config.namespace")
    tp_size = config.tp_size if config else 1
    pp = f"/pp{config.pp_rank}of{config.pp_size}" if config and config.pp_size > 1 else ""
    return f"{model}/tp{tp_size}{pp}"


class KVStoreHiCache(HiCacheStorage):
    """kvstore as SGLang's HiCache L3 storage (one instance per TP rank)."""

    def __init__(self, storage_config: HiCacheStorageConfig | None = None,
                 kwargs: dict[str, Any] | None = None) -> None:
        extra = dict((storage_config.extra_config if storage_config else None) or {})
        extra.update(kwargs or {})
        if storage_config is not None and storage_config.is_mla_model:
            raise InvalidArgument("KVStoreHiCache stores MHA pages; MLA models are not "
                                  "supported yet")
        self._config = storage_config
        self._extra = extra
        self._client: Client | None = None
        self.mem_pool_host: Any = None
        self.num_pages_set = self.num_pages_got = self.num_failures = 0
        self.num_pages_in_place = 0  # pages got in place from the daemon's arena

    # ------------------------------------------------------------------ registration

    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        super().register_mem_pool_host(mem_pool_host)
        pool = mem_pool_host
        if pool.layout not in _LAYOUTS:
            raise InvalidArgument(f"KVStoreHiCache supports host pool layouts "
                                  f"{sorted(_LAYOUTS)}, got {pool.layout!r}")
        if getattr(pool, "v_head_dim", pool.head_dim) != pool.head_dim:
            raise InvalidArgument(f"K head dim {pool.head_dim} != V head dim {pool.v_head_dim}")
        if pool.page_size < _MIN_PAGE_SIZE or pool.dtype not in DTYPE_NAMES:
            raise InvalidArgument(
                f"KVStoreHiCache needs --page-size >= {_MIN_PAGE_SIZE} and a float16/bfloat16/"
                f"float32 KV cache, got page size {pool.page_size}, dtype {pool.dtype}")
        layout = KVLayout(num_layers=pool.layer_num, num_kv_heads=pool.head_num,
                          head_dim=pool.head_dim, dtype=DTYPE_NAMES[pool.dtype],
                          chunk_tokens=pool.page_size)
        self._client = Client(self._extra.get("address", "127.0.0.1:50051"),
                              namespace_of(self._config, self._extra), layout,
                              token=self._extra.get("token"),
                              timeout_s=float(self._extra.get("timeout_s", 10.0)),
                              tp_rank=self._config.tp_rank if self._config else 0,
                              transport=self._extra.get("transport", "auto"))

    def _page(self, slot: int) -> torch.Tensor:
        """The host pool page starting at ``slot`` as a [layers, 2, heads, page, dim] view."""
        pool = self.mem_pool_host
        axis, perm = _LAYOUTS[pool.layout]
        index = [slice(None)] * 5
        index[axis] = slice(slot, slot + pool.page_size)
        return pool.kv_buffer[tuple(index)].permute(*perm)

    def _flat_page(self, flat: torch.Tensor) -> torch.Tensor:
        """A flat data page (the tensor API's form, in the pool's layout) as canonical."""
        pool = self.mem_pool_host
        axis, perm = _LAYOUTS[pool.layout]
        shape = [2, pool.layer_num, pool.head_num, pool.head_dim]
        shape.insert(axis, pool.page_size)
        return flat.view(shape).permute(*perm)

    def _tokens(self, key: str) -> np.ndarray:
        return page_tokens(key, self.mem_pool_host.page_size)

    # ------------------------------------------------------------------ zero-copy v1

    def batch_set_v1(self, keys: list[str], host_indices: torch.Tensor,
                     extra_info: Any = None) -> list[bool]:
        slots = self._page_slots(keys, host_indices)
        return [self._put(key, self._page(slot)) for key, slot in zip(keys, slots, strict=True)]

    def batch_get_v1(self, keys: list[str], host_indices: torch.Tensor,
                     extra_info: Any = None) -> list[bool]:
        slots = self._page_slots(keys, host_indices)
        results = [False] * len(keys)
        for i, (key, slot) in enumerate(zip(keys, slots, strict=True)):
            if not self._get_into(key, self._page(slot)):
                break  # SGLang uses only the leading run of hits
            results[i] = True
        return results

    def _get_into(self, key: str, page: torch.Tensor) -> bool:
        """Read page ``key`` into ``page`` (a host pool view); False on a miss."""
        if self._client.may_view():
            got = self._view_into(key, page)
            if got is not None:
                return got
        got = self._get(key)
        if got is None:
            return False
        page.copy_(got)
        return True

    def _view_into(self, key: str, page: torch.Tensor) -> bool | None:
        """Copy page ``key`` out of the daemon's arena into ``page`` (one copy, each layer
        hashed right before it is copied); None when it must be streamed."""
        try:
            view = self._client.view(self._tokens(key), position_free=True, verify=False)
        except (PermissionDenied, NotFound, InvalidArgument, Corrupt) as exc:
            log.info("kvstore page %s streams: %s", key, exc)  # other host, compressed
            return None
        except Exception as exc:  # dead daemon: a miss, SGLang recomputes
            self.num_failures += 1
            log.warning("kvstore get of page %s failed: %s", key, exc)
            return False
        with view:
            if not view.chunks:
                return None if view.lease.num_chunks_stored else False  # below DRAM / miss
            dst, src = storage_view(page), view.chunks[0]  # [layers, 2, heads, page, dim]
            checksum = view.checksum(0)
            for layer in range(len(src)):
                checksum.update(layer)
                np.copyto(dst[layer], src[layer])
            try:
                checksum.check()
            except Corrupt as exc:
                # Streamed, the daemon verifies its copy, drops it and serves the page
                # from a lower tier if one holds it intact, else a miss; what was
                # written here is overwritten or, on a miss, ignored by SGLang.
                self.num_failures += 1
                log.warning("kvstore page %s is corrupt in the arena (%s); streaming it",
                            key, exc)
                return None
        self.num_pages_got += 1
        self.num_pages_in_place += 1
        return True

    def _page_slots(self, keys: list[str], host_indices: torch.Tensor) -> list[int]:
        page = self.mem_pool_host.page_size
        if host_indices.numel() != len(keys) * page:
            raise InvalidArgument(f"{len(keys)} page keys need {len(keys) * page} host "
                                  f"indices, got {host_indices.numel()}")
        firsts = host_indices.view(len(keys), page)
        if len(keys) and bool(((firsts[:, -1] - firsts[:, 0]) != page - 1).any()):
            raise InvalidArgument("host indices of a page must be consecutive slots")
        return firsts[:, 0].tolist()

    # ------------------------------------------------------------------ one page

    def _put(self, key: str, page: torch.Tensor) -> bool:
        try:
            self._client.put_chunk(self._tokens(key), page)
        except Exception as exc:  # a lost page is only a later miss
            self.num_failures += 1
            log.warning("kvstore put of page %s failed: %s", key, exc)
            return False
        self.num_pages_set += 1
        return True

    def _get(self, key: str) -> torch.Tensor | None:
        try:
            got = self._client.get_chunk(self._tokens(key))
        except Exception as exc:  # dead daemon or corrupt page: a miss, SGLang recomputes
            self.num_failures += 1
            log.warning("kvstore get of page %s failed: %s", key, exc)
            return None
        if got is not None:
            self.num_pages_got += 1
        return got

    def exists(self, key: str) -> bool:
        try:
            return self._client.lookup_chunk(self._tokens(key))
        except Exception as exc:
            self.num_failures += 1
            log.warning("kvstore lookup of page %s failed: %s", key, exc)
            return False

    def batch_exists(self, keys: list[str], extra_info: Any = None) -> int:
        """The number of leading pages stored (one lookup per page, stopping at a miss)."""
        for i, key in enumerate(keys):
            if not self.exists(key):
                return i
        return len(keys)

    # ------------------------------------------------------------------ tensor API

    def get(self, key: str, target_location: Any = None, target_sizes: Any = None) -> Any:
        if target_location is None:
            target_location = self.mem_pool_host.get_dummy_flat_data_page()
        return target_location if self._get_into(key, self._flat_page(target_location)) \
            else None

    def batch_get(self, keys: list[str], target_locations: Any = None,
                  target_sizes: Any = None) -> list[Any]:
        targets = target_locations or [None] * len(keys)
        return [self.get(key, target) for key, target in zip(keys, targets, strict=True)]

    def set(self, key: str, value: Any = None, target_location: Any = None,
            target_sizes: Any = None) -> bool:
        return self._put(key, self._flat_page(value))

    def batch_set(self, keys: list[str], values: Any = None, target_locations: Any = None,
                  target_sizes: Any = None) -> bool:
        return all([self.set(key, value) for key, value in zip(keys, values, strict=True)])

    # ------------------------------------------------------------------ housekeeping

    def clear(self) -> None:
        """Nothing to do: pages are shared with other servers and evicted by the daemon."""

    def get_stats(self) -> dict[str, int]:
        return {"pages_set": self.num_pages_set, "pages_got": self.num_pages_got,
                "pages_in_place": self.num_pages_in_place, "failures": self.num_failures}

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
