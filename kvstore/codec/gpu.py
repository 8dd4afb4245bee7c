"""Decode kvq objects on a torch device: Triton rANS lanes, torch dequantisation.

The host validates the object and the sections' side information (a few KB), then
ships words, lane offsets and distribution bytes to the device. CDFs are expanded
there with the same integer code as on the CPU (dist.expand_cdf), the Triton kernel
decodes every lane of the requested layers at once, and torch dequantises. Symbols
are bit-identical to the CPU decoder's (tests/codec/test_kernel.py); the float
output may differ from the CPU's in the last bit (different summation order of the
inverse Hadamard).
"""

from __future__ import annotations

import numpy as np
import torch

from kvstore.codec import dist
from kvstore.codec import section as sec
from kvstore.codec.format import ParsedObject
from kvstore.codec.kvq import value_kind
from kvstore.codec.quant import RATIO
from kvstore.errors import Corrupt

_TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _parse_all(obj: ParsedObject, layers: range) -> list[sec.SectionView]:
    h = obj.header
    vkind = value_kind(h.head_dim)
    views = []
    for layer in layers:
        for kv_index, kind in ((0, sec.KIND_KEYS), (1, vkind)):
            views.append(sec.parse_section(obj.sections[2 * layer + kv_index], kind,
                                           h.num_kv_heads, h.num_tokens, h.head_dim))
    if len({v.channels_per_lane for v in views}) > 1:
        raise Corrupt("sections of one object disagree on channels per lane")
    return views


def decode_symbols(obj: ParsedObject, layers: range, device: torch.device | str
                   ) -> tuple[list[sec.SectionView], torch.Tensor]:
    """Symbols of the given layers' sections, ``[sections, C, T]`` uint8 on ``device``."""
    from kvstore.kernels.kvq_decode import decode_lanes_triton

    h = obj.header
    views = _parse_all(obj, layers)
    channels = h.num_kv_heads * h.head_dim
    lane_words = np.concatenate([v.lane_words for v in views]).astype(np.int64)
    ends = np.cumsum(lane_words)
    words = np.concatenate([v.words for v in views]).astype(np.int32)
    put = lambda a: torch.from_numpy(np.array(a)).to(device)  # noqa: E731  (a writable copy)
    mu = put(np.concatenate([v.mu for v in views]))
    ss = put(np.concatenate([v.shape_scale for v in views]))
    bins = put(np.repeat([v.num_symbols for v in views], channels).astype(np.int64))
    cdf = dist.expand_cdf(torch, put(dist.WEIGHTS), mu, ss, bins)
    symbols, ok = decode_lanes_triton(put(words), put(ends - lane_words), put(ends), cdf,
                                      views[0].channels_per_lane, h.num_tokens)
    if not ok:
        raise Corrupt("entropy-coded stream is damaged (lane state or length mismatch)")
    return views, symbols.view(len(views), channels, h.num_tokens)


def _dequantize(view: sec.SectionView, sym: torch.Tensor, heads: int, dim: int,
                ratio: torch.Tensor, hadamard: torch.Tensor | None) -> torch.Tensor:
    """sym ``[C, T]`` -> float32 ``[heads, T, dim]``."""
    device = sym.device
    tokens = sym.shape[1]
    q = sym.to(torch.float32)
    base = torch.tensor(view.base, dtype=torch.float32, device=device)
    codes = torch.from_numpy(np.array(view.codes)).to(device).long()  # a writable copy
    if view.mins is not None:
        step = base * ratio[codes] / float(view.num_symbols - 1)  # [C]
        mins = torch.from_numpy(np.array(view.mins)).to(device)
        x = mins[:, None] + q * step[:, None]  # [C, T]
        return x.view(heads, dim, tokens).transpose(1, 2)
    step = 2.0 * base * ratio[codes] / float(view.num_symbols - 1)  # [H*T]
    half = float((view.num_symbols - 1) // 2)
    y = (q.view(heads, dim, tokens).transpose(1, 2) - half) * step.view(heads, tokens, 1)
    return y @ hadamard if hadamard is not None and view.kind == sec.KIND_VALUES else y


def decode_on_device(obj: ParsedObject, layers: range, device: torch.device | str
                     ) -> torch.Tensor:
    """Decode layers to ``[len(layers), 2, heads, tokens, dim]`` in the header's dtype."""
    from kvstore.kernels.kvq_decode import hadamard

    h = obj.header
    views, symbols = decode_symbols(obj, layers, device)
    ratio = torch.from_numpy(RATIO.copy()).to(device)
    rot = hadamard(h.head_dim, device) if h.head_dim & (h.head_dim - 1) == 0 else None
    out = torch.empty((len(layers), 2, h.num_kv_heads, h.num_tokens, h.head_dim),
                      dtype=_TORCH_DTYPES[h.dtype], device=device)
    for i, view in enumerate(views):
        out[i // 2, i % 2] = _dequantize(view, symbols[i], h.num_kv_heads, h.head_dim, ratio, rot)
    return out
