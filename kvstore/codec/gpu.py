"""Decode kvq objects on a torch device: Triton rANS lanes, batched torch dequantisation.

``decode_many_on_device`` decodes any number of objects with a fixed number of
device operations, whatever the number of objects, layers and sections:

1. The host validates every object's sections (``section.parse_section``, a few
   KB of side information each) and concatenates words, lane offsets,
   distribution bytes and scales of all of them into ONE packed buffer (pinned
   on CUDA), copied to the device in one transfer.
2. One Triton launch expands every channel's CDF (``expand_cdfs``, the integers of
   ``dist.expand_cdf``) and one decodes every lane of every section of every
   object (``launch_decode_lanes``), writing symbols in the ``[sections, heads,
   tokens, head_dim]`` order of the result.
3. Dequantisation runs once over all key sections (``mins + q * step`` per
   channel, written straight into the result in its dtype) and once over all
   value sections (``q - half``, one batched matmul by the Hadamard matrix, then
   times the per-(head, token) step, written straight into the result).
4. One device-to-host transfer brings back every lane's end-of-stream check and a
   per-layer finiteness check; a damaged lane (or a forged scale that overflows
   the dtype) in any object raises Corrupt naming the object, and no tensor is
   returned.

Objects are grouped by (heads, head_dim, tokens, channels per lane, dtype); each
group costs one set of launches (in practice a model's chunks form one group).
``decode_on_device`` is the one-object case of the same code.

Symbols are bit-identical to the CPU decoder's (tests/codec/test_kernel.py); the
float output may differ from the CPU's in the last bits (the rotation is applied
before the per-token scale, and in a different summation order).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import torch

from kvstore.codec import dist
from kvstore.codec import section as sec
from kvstore.codec.format import ParsedObject
from kvstore.codec.kvq import value_kind
from kvstore.codec.quant import RATIO
from kvstore.codec.rans import decode_flat
from kvstore.errors import Corrupt, InvalidArgument
from kvstore.models.dtypes import TORCH_DTYPES

_ALIGN = 8  # every array of the packed buffer starts at a multiple of 8 bytes
_RATIO: dict[torch.device, torch.Tensor] = {}


def _parse_all(obj: ParsedObject, layers: range) -> list[sec.SectionView]:
    """The validated sections of ``layers``, in (layer, K|V) order."""
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


class _Packer:
    """Host arrays laid out in one byte buffer, shipped to the device in one copy."""

    def __init__(self) -> None:
        self._parts: list[tuple[list[np.ndarray], np.dtype, int, int]] = []
        self.nbytes = 0
        self.host: torch.Tensor | None = None

    def add(self, arrays: list[np.ndarray], dtype: str) -> None:
        dt = np.dtype(dtype)
        count = sum(a.size for a in arrays)
        self._parts.append((arrays, dt, self.nbytes, count))
        self.nbytes += -(-count * dt.itemsize // _ALIGN) * _ALIGN

    def fill(self, pin: bool) -> None:
        """Copy every array into the (page-locked if ``pin``) host buffer."""
        self.host = torch.empty(max(self.nbytes, _ALIGN), dtype=torch.uint8, pin_memory=pin)
        buf = self.host.numpy()
        for i, (arrays, dt, offset, count) in enumerate(self._parts):
            dst = buf[offset : offset + count * dt.itemsize].view(dt)
            if len(arrays) == 1:
                dst[:] = arrays[0].reshape(-1)
            elif arrays:
                np.concatenate([a.reshape(-1) for a in arrays], out=dst)
            self._parts[i] = ([], dt, offset, count)  # drop the views of the objects

    def ship(self, device: torch.device) -> list[torch.Tensor]:
        """One host-to-device copy; one device tensor per ``add``, in order."""
        assert self.host is not None
        dev = self.host.to(device, non_blocking=self.host.is_pinned())
        return [dev[offset : offset + count * dt.itemsize].view(_TORCH_VIEW[dt.str])
                for _arrays, dt, offset, count in self._parts]


@dataclass
class _Group:
    """Objects decoded by one set of launches: same shapes, lanes and dtype."""

    heads: int
    dim: int
    tokens: int
    cpl: int
    dtype: str
    members: list[int] = field(default_factory=list)  # object indices, in order
    layers: list[int] = field(default_factory=list)  # layers decoded per member
    views: list[sec.SectionView] = field(default_factory=list)  # member-major
    packer: _Packer = field(default_factory=_Packer)
    rotated: list[int] = field(default_factory=list)  # value sections with a Hadamard rotation
    layers_total: int = 0


_TORCH_VIEW = {"|u1": torch.uint8, "<u2": torch.int16, "<i8": torch.int64, "<f4": torch.float32}


def _layer_ranges(objects: Sequence[ParsedObject],
                  layers: range | Sequence[range] | None) -> list[range]:
    if layers is None:
        ranges = [range(o.header.num_layers) for o in objects]
    elif isinstance(layers, range):
        ranges = [layers] * len(objects)
    else:
        ranges = list(layers)
        if len(ranges) != len(objects):
            raise InvalidArgument(f"{len(ranges)} layer ranges for {len(objects)} objects")
    for i, (obj, r) in enumerate(zip(objects, ranges, strict=True)):
        if not isinstance(r, range):
            raise InvalidArgument(f"layers of object {i} must be a range, got {type(r).__name__}")
        if len(r) and (min(r) < 0 or max(r) >= obj.header.num_layers):
            raise InvalidArgument(f"layers {r} of object {i} are out of range, "
                                  f"it has {obj.header.num_layers}")
    return ranges


def _tag(i: int, n: int) -> str:
    return f"object {i}: " if n > 1 else ""


def _group(objects: Sequence[ParsedObject], ranges: list[range]) -> list[_Group]:
    groups: dict[tuple, _Group] = {}
    for i, (obj, r) in enumerate(zip(objects, ranges, strict=True)):
        h = obj.header
        if not len(r):
            continue
        try:
            views = _parse_all(obj, r)
        except Corrupt as e:
            raise Corrupt(f"{_tag(i, len(objects))}{e}") from e
        cpl = views[0].channels_per_lane
        key = (h.num_kv_heads, h.head_dim, h.num_tokens, cpl, h.dtype)
        g = groups.get(key)
        if g is None:
            g = groups[key] = _Group(*key)
        g.members.append(i)
        g.layers.append(len(r))
        g.views.extend(views)
    return list(groups.values())


@dataclass
class _Launched:
    out: torch.Tensor  # [layers, 2, heads, tokens, dim] in the dtype
    ok: torch.Tensor  # [lanes] int32
    finite: torch.Tensor  # [layers] bool


def _add_lanes(p: _Packer, views: list[sec.SectionView], channels: int) -> None:
    """Pack what the lane decoder needs (6 arrays, in ``_launch_lanes`` order)."""
    lane_words = np.concatenate([v.lane_words for v in views]).astype(np.int64)
    ends = np.cumsum(lane_words)
    p.add([v.words for v in views], "<u2")
    p.add([ends - lane_words], "<i8")
    p.add([ends], "<i8")
    p.add([v.mu for v in views], "|u1")
    p.add([v.shape_scale for v in views], "|u1")
    p.add([np.repeat(np.array([v.num_symbols for v in views], np.uint8), channels)], "|u1")


def _launch_lanes(shipped: list[torch.Tensor], cpl: int, tokens: int, out_dim: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """CDF expansion and lane decode over ``_add_lanes``' arrays: (symbols, lane ok)."""
    from kvstore.kernels import kvq_decode as kernel

    if (kernel.PREC_BITS, kernel.MAX_SYMBOLS) != (dist.PREC_BITS, dist.MAX_SYMBOLS):
        raise InvalidArgument("kernel constants disagree with kvstore.codec.dist")
    words, starts, ends, mu, ss, bins = shipped
    cdfs = kernel.expand_cdfs(mu, ss, bins, dist.WEIGHTS)
    return kernel.launch_decode_lanes(words, starts, ends, cdfs, cpl, tokens, out_dim=out_dim,
                                      num_symbols=bins)


def _pack_group(g: _Group, pin: bool) -> None:
    """Host half of a group: everything the device needs, in one packed buffer."""
    keys, values = g.views[0::2], g.views[1::2]
    f32 = lambda xs: [np.array(xs, np.float32)]  # noqa: E731
    p = g.packer
    _add_lanes(p, g.views, g.heads * g.dim)
    p.add([cast(np.ndarray, v.mins) for v in keys], "<f4")  # keys always have minima
    p.add([v.codes for v in keys], "|u1")
    p.add([v.codes for v in values], "|u1")
    # Per section, as the CPU decoder's float32 operands: base and num_symbols - 1
    # (keys); 2 * base, num_symbols - 1 and its half (values).
    p.add(f32([v.base for v in keys]), "<f4")
    p.add(f32([v.num_symbols - 1 for v in keys]), "<f4")
    p.add(f32([2.0 * np.float32(v.base) for v in values]), "<f4")
    p.add(f32([v.num_symbols - 1 for v in values]), "<f4")
    p.add(f32([(v.num_symbols - 1) // 2 for v in values]), "<f4")
    p.fill(pin)
    g.rotated = [i for i, v in enumerate(values) if v.kind == sec.KIND_VALUES]
    g.layers_total = len(keys)
    g.views = []  # the packed buffer holds all the device needs


def _decode_group(g: _Group, device: torch.device) -> _Launched:
    """Queue the decode of one packed group; nothing waits for the device."""
    from kvstore.kernels.kvq_decode import hadamard

    nl, channels = g.layers_total, g.heads * g.dim
    shipped = g.packer.ship(device)
    mins, kcodes, vcodes, kbase, ktop, vbase2, vtop, vhalf = shipped[6:]
    symbols, ok = _launch_lanes(shipped[:6], g.cpl, g.tokens, g.dim)
    sym = symbols.view(nl, 2, g.heads, g.tokens, g.dim)
    ratio = _RATIO.get(device)
    if ratio is None:
        ratio = _RATIO[device] = torch.from_numpy(RATIO.copy()).to(device)
    out = torch.empty((nl, 2, g.heads, g.tokens, g.dim), dtype=TORCH_DTYPES[g.dtype],
                      device=device)
    # Keys: mins[c] + q * (base * RATIO[code[c]] / (A - 1)), per channel c = (head, d).
    kstep = kbase[:, None] * ratio[kcodes.view(nl, channels).long()] / ktop[:, None]
    shape = (nl, g.heads, 1, g.dim)
    torch.addcmul(mins.view(shape), sym[:, 0], kstep.view(shape), out=out[:, 0])
    # Values: (q - half) rotated back, times 2 * base * RATIO[code[h, t]] / (A - 1).
    vstep = vbase2[:, None] * ratio[vcodes.view(nl, g.heads * g.tokens).long()] / vtop[:, None]
    z = torch.sub(sym[:, 1], vhalf.view(nl, 1, 1, 1))  # uint8 - float32: float32, one pass
    if len(g.rotated) == nl:
        z = torch.matmul(z, hadamard(g.dim, device))
    elif g.rotated:
        idx = torch.tensor(g.rotated, device=device)
        z[idx] = torch.matmul(z[idx], hadamard(g.dim, device))
    torch.mul(z, vstep.view(nl, g.heads, g.tokens, 1), out=out[:, 1])
    # Largest |value| per layer in one read of the result, no temporary: inf where a
    # forged scale overflowed the dtype (everything before the cast is finite).
    peak = torch.linalg.vector_norm(out.view(nl, -1), ord=float("inf"), dim=1)
    finite = torch.isfinite(peak)
    return _Launched(out, ok, finite)


@dataclass
class PreparedBatch:
    """The host half of a batched decode (``prepare_many``): sections validated and
    packed, one buffer per group; ``decode_prepared`` runs the device half (and may
    run it again: the buffers stay)."""

    device: torch.device
    empty: list[tuple[int, tuple[int, int, int, int, int], torch.dtype]]  # no layers
    groups: list[_Group]
    num_objects: int


def prepare_many(objects: Sequence[ParsedObject], device: torch.device | str,
                 layers: range | Sequence[range] | None = None) -> PreparedBatch:
    """Validate and pack the objects for ``decode_prepared`` (host work only).

    Raises:
        Corrupt: inconsistent side information (names the object).
        InvalidArgument: a layer range outside an object.
    """
    device = torch.device(device)
    objects = list(objects)
    ranges = _layer_ranges(objects, layers)
    groups = _group(objects, ranges)
    for g in groups:
        _pack_group(g, pin=device.type == "cuda")
    empty = [(i, (0, 2, o.header.num_kv_heads, o.header.num_tokens, o.header.head_dim),
              TORCH_DTYPES[o.header.dtype])
             for i, (o, r) in enumerate(zip(objects, ranges, strict=True)) if not len(r)]
    return PreparedBatch(device, empty, groups, len(objects))


def decode_prepared(batch: PreparedBatch) -> list[torch.Tensor]:
    """The device half: one H2D copy, the launches and one D2H check per call."""
    launched = [_decode_group(g, batch.device) for g in batch.groups]
    results: list[torch.Tensor | None] = [None] * batch.num_objects
    for i, shape, dtype in batch.empty:
        results[i] = torch.empty(shape, dtype=dtype, device=batch.device)
    if launched:
        # The one synchronisation: lane checks and finiteness of every group at once.
        checks = [t for run in launched for t in (run.ok.bool(), run.finite)]
        flags = torch.cat(checks).cpu().numpy()
        pos = 0
        for g, run in zip(batch.groups, launched, strict=True):
            num_lanes, nl = run.ok.shape[0], run.finite.shape[0]
            lane_ok = flags[pos : pos + num_lanes]
            finite = flags[pos + num_lanes : pos + num_lanes + nl]
            pos += num_lanes + nl
            if not (lane_ok.all() and finite.all()):
                _raise_first_bad(batch.num_objects, g, lane_ok, finite)
            first = 0
            for i, count in zip(g.members, g.layers, strict=True):
                results[i] = run.out[first : first + count]
                first += count
    return results  # type: ignore[return-value]


def decode_many_on_device(objects: Sequence[ParsedObject], device: torch.device | str,
                          layers: range | Sequence[range] | None = None) -> list[torch.Tensor]:
    """Decode many kvq objects at once; one result per object, in order.

    Args:
        objects: parsed kvq objects (``kvq.parse_kvq``), any mix of levels,
            calibration tables and layouts (each distinct (heads, head_dim, tokens,
            channels per lane, dtype) costs one set of launches).
        device: a CUDA device (or the CPU under TRITON_INTERPRET=1).
        layers: None for all layers, one range for every object, or one range
            per object.

    Returns:
        ``[len(layers), 2, heads, tokens, dim]`` tensors in each header's dtype;
        objects of one group are consecutive views of one tensor (``torch.stack``
        them for a batch tensor).

    Raises:
        Corrupt: any object is damaged (the message names the first one by its
            index when there are several); nothing is returned then.
        InvalidArgument: a layer range outside an object.
    """
    return decode_prepared(prepare_many(objects, device, layers))


def _raise_first_bad(num_objects: int, g: _Group, lane_ok: np.ndarray,
                     finite: np.ndarray) -> None:
    lanes_per_layer = 2 * g.heads * g.dim // g.cpl
    first = 0
    for i, count in zip(g.members, g.layers, strict=True):
        tag = _tag(i, num_objects)
        if not lane_ok[first * lanes_per_layer : (first + count) * lanes_per_layer].all():
            raise Corrupt(f"{tag}entropy-coded stream is damaged (lane state or length mismatch)")
        if not finite[first : first + count].all():
            raise Corrupt(f"{tag}decoded values overflow {g.dtype}: the object is forged")
        first += count
    raise AssertionError("a failed check that no object owns")


def decode_on_device(obj: ParsedObject, layers: range, device: torch.device | str
                     ) -> torch.Tensor:
    """Decode layers of one object to ``[len(layers), 2, heads, tokens, dim]`` in its dtype."""
    return decode_many_on_device([obj], device, layers)[0]


def decode_symbols(obj: ParsedObject, layers: range, device: torch.device | str
                   ) -> tuple[list[sec.SectionView], torch.Tensor]:
    """The raw symbols of the given layers' sections, ``[sections, C, T]`` uint8, and the
    sections' views: the first two steps of ``decode_on_device``, for tests and tools.

    Raises:
        Corrupt: damaged sections or lanes.
    """
    device = torch.device(device)
    h = obj.header
    views = _parse_all(obj, layers)
    channels = h.num_kv_heads * h.head_dim
    if not views:
        return views, torch.empty((0, channels, h.num_tokens), dtype=torch.uint8, device=device)
    p = _Packer()
    _add_lanes(p, views, channels)
    p.fill(pin=False)
    symbols, ok = _launch_lanes(p.ship(device), views[0].channels_per_lane, h.num_tokens, 1)
    if not bool(ok.all()):
        raise Corrupt("entropy-coded stream is damaged (lane state or length mismatch)")
    return views, symbols.view(len(views), channels, h.num_tokens)


def decode_lanes_on_cpu(words: torch.Tensor, lane_start: torch.Tensor, lane_end: torch.Tensor,
                        cdf: torch.Tensor, channels_per_lane: int,
                        num_tokens: int) -> tuple[torch.Tensor, bool]:
    """The CPU decode of ``kvstore.kernels.kvq_decode``'s lanes, its reference: (symbols
    ``[C, T]`` uint8, all lanes intact)."""
    w = words.cpu().numpy()
    w = w.view(np.uint16) if w.dtype == np.int16 else w.astype(np.uint16)
    symct = decode_flat(w, lane_start.cpu().numpy(), lane_end.cpu().numpy(),
                        cdf.cpu().numpy().astype(np.int32), channels_per_lane, num_tokens,
                        dist.MAX_SYMBOLS)
    if symct is None:
        return torch.zeros((cdf.shape[0], num_tokens), dtype=torch.uint8), False
    return torch.from_numpy(symct), True
