"""One kvq section: the quantised, entropy-coded ``[heads, tokens, head_dim]`` of a (layer, K|V).

Byte layout (little-endian), C = heads * head_dim channels, N = C / cpl lanes:

    offset size      field
    0      1         kind              0 keys (asymmetric per channel), 1 values (Hadamard,
                                       symmetric per token), 2 values without rotation
    1      1         num_symbols       alphabet size A, 2..128 (odd for values)
    2      1         channels_per_lane cpl; lane l codes channels [l*cpl, (l+1)*cpl)
    3      1         reserved          0
    4      4         base              f32 largest channel range (keys; with query-weighted
                                       steps, the widest channel's grid) / token max-abs (values)
    8      2C + C    keys: f16 channel minima, u8 range codes (range = base * 2**(-code/16))
           H*T       values: u8 scale codes per (head, token)
    ...    C         mu                distribution location per channel (dist.py)
    ...    C         shape_scale       distribution shape/scale per channel
    ...    0|1       pad               to an even offset
    ...    2N        lane_words        u16 words per lane
    ...    2W        words             u16 rANS words, lanes concatenated (rans.py)

Every field is range-checked on decode; anything inconsistent raises Corrupt.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from kvstore.codec import dist, fit, quant, rans
from kvstore.errors import Corrupt, InvalidArgument

KIND_KEYS, KIND_VALUES, KIND_VALUES_PLAIN = 0, 1, 2
_HEAD = struct.Struct("<BBBBf")
_HEAD_BYTES = 8
assert _HEAD.size == _HEAD_BYTES
_TARGET_LANE_SYMBOLS = 2048  # 8 channels of a 256-token chunk: lane flush 0.016 bits/element
_MAX_BASE = 1e30  # keeps every dequantised float32 finite (63 * base * ratio + |min|)
MAX_TOKENS = 65000  # a lane must fit u16 word counts (cpl * tokens + 2 words at most)


def channels_per_lane(num_channels: int, num_tokens: int) -> int:
    """Largest of 8, 4, 2, 1 dividing the channels with at most ~2048 symbols per lane."""
    for cpl in (8, 4, 2):
        if num_channels % cpl == 0 and cpl * num_tokens <= _TARGET_LANE_SYMBOLS:
            return cpl
    return 1


def _side_bytes(kind: int, heads: int, tokens: int, dim: int) -> int:
    channels = heads * dim
    scales = 3 * channels if kind == KIND_KEYS else heads * tokens
    size = _HEAD_BYTES + scales + 2 * channels
    return size + (size & 1)


def encode_section(x: np.ndarray, kind: int, num_symbols: int,
                   key_weights: np.ndarray | None = None) -> bytes:
    """Encode x ``[heads, tokens, head_dim]`` float32 as one section.

    ``key_weights`` (keys only, ``[heads * head_dim]``, from a calibration table):
    the RMS query component each key channel meets. Without them every channel gets
    ``num_symbols - 1`` steps over its range; with them channel c gets a step
    proportional to ``1 / key_weights[c]`` (the logit error a channel adds is its
    step times the query it meets, so equal weighted steps minimise the logit error
    at a given bit count), scaled so that the geometric mean step is the unweighted
    one, and the section's alphabet grows to cover the widest channel (at most
    128 symbols). Only the encoder's choice of ranges and alphabet changes: the
    bytes decode as any other section.
    """
    heads, tokens, dim = x.shape
    if not 2 <= num_symbols <= dist.MAX_SYMBOLS:
        raise InvalidArgument(f"bins must be in [2, {dist.MAX_SYMBOLS}], got {num_symbols}")
    if kind != KIND_KEYS and num_symbols % 2 == 0:
        raise InvalidArgument(f"value bins must be odd (a grid through 0), got {num_symbols}")
    if tokens > MAX_TOKENS:
        raise InvalidArgument(f"kvq objects hold at most {MAX_TOKENS} tokens, got {tokens}")
    channels = heads * dim
    symct = np.empty((channels, tokens), dtype=np.uint8)
    if kind == KIND_KEYS:
        lo = np.empty(channels, dtype=np.float32)
        hi = np.empty(channels, dtype=np.float32)
        quant.channel_ranges(x, lo, hi)
        mins = _round_down_f16(lo)
        lo = mins.astype(np.float32)
        if key_weights is not None:
            num_symbols, hi = _weighted_ranges(lo, hi, num_symbols, key_weights)
        hist = np.empty((channels, num_symbols), dtype=np.int64)
        codes = np.empty(channels, dtype=np.uint8)
        base = quant.quantize_keys(x, lo, hi, num_symbols, symct, hist, codes)
        scales = mins.tobytes() + codes.tobytes()
    else:
        hist = np.empty((channels, num_symbols), dtype=np.int64)
        codes = np.empty(heads * tokens, dtype=np.uint8)
        base = quant.quantize_values(x, num_symbols, kind == KIND_VALUES, symct, hist, codes)
        scales = codes.tobytes()
    if base > _MAX_BASE:
        raise InvalidArgument(f"kvq stores magnitudes up to {_MAX_BASE:g}, got {base:g}")
    mu, shape_scale, cdf = fit.fit_and_expand(hist)
    cpl = channels_per_lane(channels, tokens)
    lane_words, words = rans.encode_section_lanes(symct, cdf, cpl)
    head = _HEAD.pack(kind, num_symbols, cpl, 0, base)
    side = head + scales + mu.tobytes() + shape_scale.tobytes()
    pad = b"\0" * (len(side) & 1)
    return b"".join([side, pad, lane_words.astype("<u2", copy=False).tobytes(),
                     words.astype("<u2", copy=False).tobytes()])


def _weighted_ranges(lo: np.ndarray, hi: np.ndarray, num_symbols: int,
                     key_weights: np.ndarray) -> tuple[int, np.ndarray]:
    """Alphabet and per-channel maxima giving steps proportional to 1 / key_weights."""
    if (key_weights.shape != lo.shape or not np.all(key_weights > 0)
            or not np.all(np.isfinite(key_weights))):
        raise InvalidArgument(f"key weights must be {lo.shape[0]} positive numbers")
    out = np.empty_like(hi)
    symbols = quant.weighted_key_ranges(lo, hi, key_weights, num_symbols, dist.MAX_SYMBOLS, out)
    return symbols, out


def _round_down_f16(lo: np.ndarray) -> np.ndarray:
    """float16 minima that are <= the float32 ones (so the grid covers every value)."""
    mins = lo.astype(np.float16)
    over = mins.astype(np.float32) > lo
    mins[over] = np.nextafter(mins[over], np.float16(-np.inf))
    if not np.all(np.isfinite(mins)):
        raise InvalidArgument("keys must be finite and within the float16 range")
    return mins


@dataclass(frozen=True, slots=True)
class SectionView:
    """A validated section, its arrays viewing the object bytes (no copies)."""

    kind: int  # KIND_*
    num_symbols: int  # alphabet size A
    channels_per_lane: int  # cpl
    base: float  # float32 scale base
    mins: np.ndarray | None  # keys: [C] float32 channel minima; values: None
    codes: np.ndarray  # keys: [C] u8 range codes; values: [H*T] u8 scale codes
    mu: np.ndarray  # [C] u8 distribution locations
    shape_scale: np.ndarray  # [C] u8 distribution shape/scale bytes
    lane_words: np.ndarray  # [num_lanes] u16 word count per lane
    words: np.ndarray  # [sum(lane_words)] u16 rANS words


def parse_section(buf: memoryview, expect_kind: int, heads: int, tokens: int,
                  dim: int) -> SectionView:
    """Validate one section's head and sizes; raises Corrupt."""
    if buf.nbytes < _HEAD_BYTES:
        raise Corrupt(f"section of {buf.nbytes} bytes is shorter than its {_HEAD_BYTES}-byte head")
    kind, num_symbols, cpl, reserved, base = _HEAD.unpack_from(buf)
    is_key = expect_kind == KIND_KEYS
    if (kind == KIND_KEYS) != is_key or kind > KIND_VALUES_PLAIN or reserved:
        raise Corrupt(f"section kind {kind} (reserved {reserved}) where "
                      f"{'keys' if is_key else 'values'} were expected")
    if not 2 <= num_symbols <= dist.MAX_SYMBOLS or (not is_key and num_symbols % 2 == 0):
        raise Corrupt(f"section alphabet of {num_symbols} symbols is out of range")
    channels = heads * dim
    if cpl == 0 or channels % cpl or cpl * tokens + 2 > 0xFFFF:
        raise Corrupt(f"{cpl} channels per lane does not fit {channels} channels x {tokens} tokens")
    if kind == KIND_VALUES and dim & (dim - 1):
        raise Corrupt(f"rotated values need a power-of-two head_dim, got {dim}")
    if not 0 <= base <= _MAX_BASE:  # also false for nan
        raise Corrupt(f"section base {base} is outside [0, {_MAX_BASE:g}]")
    side = _side_bytes(kind, heads, tokens, dim)
    num_lanes = channels // cpl
    if buf.nbytes < side + 2 * num_lanes or (buf.nbytes - side) % 2:
        raise Corrupt(f"section of {buf.nbytes} bytes does not fit its side information")
    arr = np.frombuffer(buf, dtype=np.uint8)
    pos = _HEAD_BYTES
    mins = None
    if is_key:
        mins = arr[pos : pos + 2 * channels].view("<f2").astype(np.float32)
        if not np.all(np.isfinite(mins)):
            raise Corrupt("section has non-finite key minima")
        codes = arr[pos + 2 * channels : pos + 3 * channels]
        pos += 3 * channels
    else:
        codes = arr[pos : pos + heads * tokens]
        pos += heads * tokens
    lane_words = arr[side : side + 2 * num_lanes].view("<u2")
    words = arr[side + 2 * num_lanes :].view("<u2")
    if int(lane_words.sum(dtype=np.int64)) != words.shape[0]:
        raise Corrupt("section lane lengths do not add up to its size")
    return SectionView(kind, num_symbols, cpl, float(base), mins, codes,
                       arr[pos : pos + channels], arr[pos + channels : pos + 2 * channels],
                       lane_words, words)


def decode_section(buf: memoryview, expect_kind: int, heads: int, tokens: int, dim: int,
                   out: np.ndarray) -> float:
    """Decode one section into out ``[heads, tokens, head_dim]`` float32; returns max |out|.

    Raises:
        Corrupt: inconsistent side information or a damaged rANS stream.
    """
    view = parse_section(buf, expect_kind, heads, tokens, dim)
    cdf = fit.expand(view.mu, view.shape_scale, view.num_symbols)
    symct = rans.decode_section_lanes(view.words, view.lane_words, cdf,
                                      view.channels_per_lane, tokens, view.num_symbols)
    if symct is None:
        raise Corrupt("entropy-coded stream is damaged (lane state or length mismatch)")
    base = np.float32(view.base)
    if view.mins is not None:
        return float(quant.dequantize_keys(symct, view.mins, view.codes, base,
                                           view.num_symbols, out))
    return float(quant.dequantize_values(symct, view.codes, base, view.num_symbols,
                                         view.kind == KIND_VALUES, out))
