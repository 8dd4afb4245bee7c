"""Shadows of one sequence: per-layer low-rank key factors, block landmarks, outliers.

Built once at prefill from the pre-RoPE keys (the SVD is the expensive part) and
persisted beside the values as a *shadow bundle*, so a resumed or prefix-hit
sequence reloads it instead of recomputing it.

Bundle bytes (little-endian):

    offset size field
    0      4    magic          b"KVSB"
    4      2    version        BUNDLE_VERSION
    6      2    reserved       0
    8      8    payload_bytes  length of the safetensors payload that follows
    16     8    checksum       xxh64 of the payload
    24          payload        safetensors: tensors + string metadata

Per-token coefficients, landmarks and mean values are stored as float16 (half the
bytes: a 7K-token SmolLM2 bundle is ~38 MB instead of ~76 MB, under the daemon's
default 64 MiB message limit) unless a value exceeds its range. They are rounded
the same way when built, so a fresh and a reloaded sequence decode identically.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

import torch
import xxhash
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from kvstore.errors import Corrupt, InvalidArgument
from kvstore.models.rope import rotate

MAGIC = b"KVSB"
BUNDLE_VERSION = 2  # 2: per-block mean values
_HEADER = struct.Struct("<4sHHQQ")
HEADER_BYTES = 24
assert _HEADER.size == HEADER_BYTES


@dataclass(slots=True)
class LayerShadow:
    """Shadow of one sparse layer. Buffers hold ``capacity_blocks``; ``num_blocks`` are valid."""

    coeffs: torch.Tensor  # [capacity_blocks * T, R] float32: per-token low-rank coefficients
    basis: torch.Tensor  # [R, Hkv * D] float32, orthonormal rows: K_pre ~= coeffs @ basis
    landmarks: torch.Tensor  # [Hkv, capacity_blocks, D] float32: mean post-RoPE key per block
    value_means: torch.Tensor  # [Hkv, capacity_blocks, D] float32: mean value per block
    outliers: torch.Tensor  # [Hkv, n_out] int64: blocks least like their landmark, kept exact
    num_blocks: int  # sealed blocks described
    block_tokens: int  # tokens per block

    @property
    def capacity_blocks(self) -> int:
        return self.landmarks.shape[1]

    def reserve(self, capacity_blocks: int) -> None:
        """Grow the per-block buffers (sealing appends generated blocks)."""
        if capacity_blocks <= self.capacity_blocks:
            return
        coeffs = self.coeffs.new_zeros(capacity_blocks * self.block_tokens, self.coeffs.shape[1])
        coeffs[: self.coeffs.shape[0]] = self.coeffs
        per_block = []
        for old in (self.landmarks, self.value_means):
            grown = old.new_zeros(old.shape[0], capacity_blocks, old.shape[2])
            grown[:, : old.shape[1]] = old
            per_block.append(grown)
        self.coeffs, (self.landmarks, self.value_means) = coeffs, per_block

    def append_block(self, k_pre: torch.Tensor, k_post: torch.Tensor, v: torch.Tensor) -> None:
        """Seal one block: k_pre/k_post/v ``[Hkv, T, D]`` (exact keys and values of it)."""
        num_kv, block_tokens, dim = k_pre.shape
        if self.num_blocks >= self.capacity_blocks:
            self.reserve(2 * self.capacity_blocks + 1)
        flat = k_pre.float().permute(1, 0, 2).reshape(block_tokens, num_kv * dim)
        start = self.num_blocks * block_tokens
        self.coeffs[start : start + block_tokens] = _rounded(flat @ self.basis.T)
        self.landmarks[:, self.num_blocks] = _rounded(k_post.float().mean(dim=1))
        self.value_means[:, self.num_blocks] = _rounded(v.float().mean(dim=1))
        self.num_blocks += 1


def build_layer_shadow(k_pre: torch.Tensor, values: torch.Tensor, rank: int, block_tokens: int,
                       num_outliers: int, exact_blocks: tuple[int, int],
                       rope: tuple[torch.Tensor, float], capacity_blocks: int) -> LayerShadow:
    """Factor pre-RoPE keys ``[Hkv, n, D]`` (n a multiple of T) and summarise their blocks.

    The summary of a block is its landmark (mean post-RoPE key) and its mean value.

    Outliers are, per kv head, the blocks whose keys are least aligned with their
    landmark (lowest min cosine), as in ShadowKV; ``exact_blocks`` = (sink blocks,
    local-window blocks) are attended exactly anyway and never chosen.
    """
    num_kv, n, dim = k_pre.shape
    num_blocks = n // block_tokens
    if n != num_blocks * block_tokens:
        raise InvalidArgument(f"{n} keys are not whole blocks of {block_tokens}")
    flat = k_pre.float().permute(1, 0, 2).reshape(n, num_kv * dim)
    _, _, vh = torch.linalg.svd(flat, full_matrices=False)
    basis = vh[:rank].contiguous()
    coeffs = torch.zeros(capacity_blocks * block_tokens, rank)
    coeffs[:n] = flat @ basis.T
    k_post = rotate(k_pre, torch.arange(n), *rope)  # [Hkv, n, D]
    blocks = k_post.view(num_kv, num_blocks, block_tokens, dim)
    landmarks = torch.zeros(num_kv, capacity_blocks, dim)
    landmarks[:, :num_blocks] = blocks.mean(dim=2)
    value_means = torch.zeros(num_kv, capacity_blocks, dim)
    value_means[:, :num_blocks] = values.float().view(num_kv, num_blocks, block_tokens,
                                                      dim).mean(dim=2)
    cos = torch.nn.functional.cosine_similarity(blocks, landmarks[:, :num_blocks, None], dim=-1)
    badness = -cos.amin(dim=-1)  # [Hkv, num_blocks]
    sink, window = exact_blocks
    badness[:, :sink] = float("-inf")
    badness[:, max(sink, num_blocks - window) :] = float("-inf")
    count = max(0, min(num_outliers, num_blocks - sink - window))
    outliers = badness.topk(count, dim=1).indices.sort(dim=1).values
    return LayerShadow(_rounded(coeffs), basis, _rounded(landmarks), _rounded(value_means),
                       outliers, num_blocks, block_tokens)


def _compact(t: torch.Tensor) -> torch.Tensor:
    """``t`` as stored in a bundle: float16 when every value fits it, else float32."""
    half = t.half()
    return half if bool(torch.isfinite(half).all()) else t.float()


def _rounded(t: torch.Tensor) -> torch.Tensor:
    """float32 holding exactly what a bundle stores for ``t``."""
    return _compact(t).float()


@dataclass(slots=True)
class ShadowBundle:
    """Everything a decoder needs besides the stored values: persisted per sequence."""

    fingerprint: str  # model fingerprint the shadows were computed with
    num_tokens: int  # prefix tokens covered (sealed blocks + tail)
    block_tokens: int
    rope_inv_freq: torch.Tensor  # [D/2] float32
    rope_scaling: float  # attention scaling applied to cos/sin
    layers: dict[int, LayerShadow]  # sparse layers only; dense layers keep exact KV
    tail_k_pre: torch.Tensor  # [L, Hkv, n_tail, D]: pre-RoPE keys of the unsealed last tokens
    tail_v: torch.Tensor  # [L, Hkv, n_tail, D]: their values (a partial block is not stored)

    @property
    def num_blocks(self) -> int:
        """Sealed prefix blocks (held by the block store)."""
        return (self.num_tokens - self.tail_k_pre.shape[2]) // self.block_tokens

    def to_bytes(self) -> bytes:
        tensors: dict[str, torch.Tensor] = {"rope_inv_freq": self.rope_inv_freq.float(),
                                            "tail_k_pre": self.tail_k_pre.float().contiguous(),
                                            "tail_v": self.tail_v.float().contiguous()}
        meta = {"fingerprint": self.fingerprint, "num_tokens": self.num_tokens,
                "block_tokens": self.block_tokens, "rope_scaling": self.rope_scaling,
                "layers": {}}
        for i, sh in self.layers.items():
            used = sh.num_blocks
            tensors[f"{i}.coeffs"] = _compact(sh.coeffs[: used * self.block_tokens]).contiguous()
            tensors[f"{i}.basis"] = sh.basis.contiguous()
            tensors[f"{i}.landmarks"] = _compact(sh.landmarks[:, :used]).contiguous()
            tensors[f"{i}.value_means"] = _compact(sh.value_means[:, :used]).contiguous()
            tensors[f"{i}.outliers"] = sh.outliers.contiguous()
            meta["layers"][str(i)] = used
        payload = st_save(tensors, metadata={"bundle": json.dumps(meta)})
        header = _HEADER.pack(MAGIC, BUNDLE_VERSION, 0, len(payload),
                              xxhash.xxh64_intdigest(payload))
        return header + payload

    @classmethod
    def from_bytes(cls, data: bytes, capacity_blocks: int = 0) -> ShadowBundle:
        """Parse and verify a bundle; per-block buffers get room for ``capacity_blocks``."""
        if len(data) < HEADER_BYTES:
            raise Corrupt(f"shadow bundle is {len(data)} bytes, shorter than its header")
        magic, version, _, length, checksum = _HEADER.unpack_from(data)
        if magic != MAGIC or version != BUNDLE_VERSION:
            raise Corrupt(f"shadow bundle has magic {magic!r} v{version}, "
                          f"expected {MAGIC!r} v{BUNDLE_VERSION}")
        payload = data[HEADER_BYTES:]
        if len(payload) != length or xxhash.xxh64_intdigest(payload) != checksum:
            raise Corrupt("shadow bundle payload fails its length or checksum")
        try:  # past the checksum, which a forger can recompute: every field is checked
            return cls._parse(payload, capacity_blocks)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError,
                SafetensorError) as exc:
            raise Corrupt(f"shadow bundle does not parse: {type(exc).__name__}: {exc}") \
                from None

    @classmethod
    def _parse(cls, payload: bytes, capacity_blocks: int) -> ShadowBundle:
        meta = _checked_meta(json.loads(_metadata(payload)))
        tensors = st_load(payload)
        layers = {}
        for key, used in meta["layers"].items():
            sh = LayerShadow(tensors[f"{key}.coeffs"].float(), tensors[f"{key}.basis"],
                             tensors[f"{key}.landmarks"].float(),
                             tensors[f"{key}.value_means"].float(),
                             tensors[f"{key}.outliers"], used,
                             meta["block_tokens"])
            _check_rows(sh)
            sh.reserve(capacity_blocks)
            layers[int(key)] = sh
        tail_k, tail_v = tensors["tail_k_pre"], tensors["tail_v"]
        if tail_k.dim() != 4 or tail_v.shape != tail_k.shape \
                or not 0 <= tail_k.shape[2] <= meta["num_tokens"]:
            raise Corrupt(f"bundle tail of shape {tuple(tail_k.shape)} / {tuple(tail_v.shape)} "
                          f"does not fit {meta['num_tokens']} tokens")
        return cls(meta["fingerprint"], meta["num_tokens"], meta["block_tokens"],
                   tensors["rope_inv_freq"], meta["rope_scaling"], layers, tail_k, tail_v)


def _checked_meta(meta: Any) -> dict[str, Any]:
    """The bundle's JSON metadata, with each field of the type and range it must have."""
    def is_count(v: Any, least: int = 0) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= least

    ok = (isinstance(meta, dict) and isinstance(meta.get("fingerprint"), str)
          and is_count(meta.get("num_tokens")) and is_count(meta.get("block_tokens"), 1)
          and isinstance(meta.get("rope_scaling"), int | float)
          and isinstance(meta.get("layers"), dict)
          and all(k.isdigit() and is_count(v) for k, v in meta["layers"].items()))
    if not ok:
        raise Corrupt(f"shadow bundle metadata is malformed: {str(meta)[:200]}")
    return meta


def _metadata(payload: bytes) -> str:
    """The bundle's JSON metadata from the safetensors header (8-byte length + JSON)."""
    (length,) = struct.unpack_from("<Q", payload)
    header = json.loads(payload[8 : 8 + length])
    return header["__metadata__"]["bundle"]


def _check_rows(sh: LayerShadow) -> None:
    """Loaded tensors are exactly ``num_blocks`` long; anything else is a forged bundle."""
    rows, blocks = sh.coeffs.shape[0], sh.landmarks.shape[1]
    if rows != sh.num_blocks * sh.block_tokens or blocks != sh.num_blocks \
            or sh.value_means.shape != sh.landmarks.shape:
        raise Corrupt(f"bundle layer has {rows} coefficient rows and {blocks} landmarks "
                      f"for {sh.num_blocks} blocks of {sh.block_tokens}")
