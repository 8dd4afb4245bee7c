"""Lane-parallel rANS, compiled with numba: the kvq codec's CPU entropy coder.

A section's symbols are arranged ``[channels, tokens]``; consecutive groups of
``channels_per_lane`` channels form one lane, an independent rANS stream with its
own word count, so a GPU decodes all lanes of an object in parallel
(``kvstore.kernels.kvq_decode``) and the CPU decodes the very same bytes.

Coder parameters: 32-bit state in [2**16, 2**32), 16-bit renormalisation words,
probabilities out of 2**14 (``dist.PREC_BITS``). With those, a decode step reads at
most one word, so the GPU kernel is branch-free. A lane's words are, in order: the
final encoder state (high word, low word), then the renormalisation words in the
order the decoder consumes them. The encoder starts every lane at state 2**16; the
decoder checks that it ends there having consumed exactly the lane's words, which
catches forged or damaged streams that slipped past the checksum.

numba, not numpy: rANS is a serial recurrence per lane, which numpy cannot
vectorise; interpreted Python runs it at ~1 MB/s. The compiled loops keep four
lanes' states in local variables (registers), so the CPU overlaps four independent
dependency chains, and avoid data-dependent branches where a mispredict would cost
more than the work it skips. The decoder finds a slot's symbol through a per-channel
table of 2**7 buckets (the symbol at each bucket's start, built per channel as it is
decoded) plus a comparison with the next CDF entry; a bucket holding more than one
symbol boundary (tails only: < 1% of symbols) takes a short loop. The encoder turns
``x // f`` into an exact float64 multiply. ``constriction`` is the reference the
tests compare sizes against.
"""

from __future__ import annotations

import numba
import numpy as np

from kvstore.codec.dist import MAX_SYMBOLS, PREC_BITS, PREC_TOTAL

STATE_LOW = 1 << 16  # lower bound of the normalised state
_MASK = (1 << PREC_BITS) - 1


# 1/f for every frequency: the encoder's division x // f becomes a float64 multiply
# (64-bit division costs ~40 cycles).
_INV_FREQ = 1.0 / np.maximum(np.arange(PREC_TOTAL + 1, dtype=np.float64), 1.0)
_HALF = np.float64(0.5)
_GROUP = 4  # lanes coded in lock-step, their states in locals

# Decoder scratch: per lane of a group, a copy of the current channel's CDF row (at
# a fixed stride, so the compiled loop addresses all four from one register) and
# its bucket table, _LUT entries of the symbol holding slot k << _LUT_SHIFT.
LUT_BITS = 7
_LUT = 1 << LUT_BITS
_LUT_SHIFT = PREC_BITS - LUT_BITS
_ROW = MAX_SYMBOLS + 8


@numba.njit(cache=True, nogil=True, inline="always")
def _enc_step(x, n, s, row, out_row, top, inv_freq):  # pragma: no cover - compiled
    """Push symbol s; words go to out_row[top - n] downwards. Indices are unsigned:
    numba adds a negative-index fix-up to every signed one."""
    start = np.int64(row[s])
    f = np.int64(row[s + np.uint64(1)]) - start
    need = x >= (f << (32 - PREC_BITS))
    out_row[top - n] = x & 0xFFFF  # always stored, kept only if due (branch-free)
    n += np.uint64(need)
    x = (x >> 16) if need else x
    # floor((x + 0.5) * (1/f)) == x // f exactly: (x + 0.5) / f is at least
    # 0.5 / f >= 2**-15 away from an integer; the float64 error is below 2**-20.
    q = np.int64((np.float64(x) + _HALF) * inv_freq[np.uint64(f)])
    return (q << PREC_BITS) + (x - q * f) + start, n


@numba.njit(cache=True, nogil=True, inline="always")
def _enc_flush(out, lens, lane, x, n):  # pragma: no cover - compiled
    top = np.uint64(out.shape[1] - 1)
    out[lane, top - n] = x & 0xFFFF
    out[lane, top - n - np.uint64(1)] = x >> 16
    lens[lane] = np.int64(n) + 2


@numba.njit(cache=True, nogil=True)
def encode_lanes(symct, cdf, channels_per_lane, out, lens, inv_freq):  # pragma: no cover
    """Encode ``symct`` ``[C, T]`` uint8 with per-channel ``cdf`` ``[C, MAX_SYMBOLS + 1]`` int32.

    ``out`` is scratch ``[num_lanes, cpl * T + 2]`` uint16; lane ``l``'s words end up in
    ``out[l, cap - lens[l]:]`` in decoder order. States are int64 (they stay < 2**32):
    numba turns mixed signed/unsigned arithmetic into float64.
    """
    num_ch, num_tok = symct.shape
    top = np.uint64(out.shape[1] - 1)
    cpl = channels_per_lane
    num_lanes = num_ch // cpl
    whole = num_lanes - num_lanes % _GROUP
    for l0 in range(0, whole, _GROUP):
        x0 = x1 = x2 = x3 = np.int64(STATE_LOW)
        n0 = n1 = n2 = n3 = np.uint64(0)
        o0, o1, o2, o3 = out[l0], out[l0 + 1], out[l0 + 2], out[l0 + 3]
        for cbase in range(cpl - 1, -1, -1):
            c = l0 * cpl + cbase
            r0, r1, r2, r3 = cdf[c], cdf[c + cpl], cdf[c + 2 * cpl], cdf[c + 3 * cpl]
            s0, s1, s2, s3 = symct[c], symct[c + cpl], symct[c + 2 * cpl], symct[c + 3 * cpl]
            for t in range(num_tok - 1, -1, -1):
                x0, n0 = _enc_step(x0, n0, s0[t], r0, o0, top, inv_freq)
                x1, n1 = _enc_step(x1, n1, s1[t], r1, o1, top, inv_freq)
                x2, n2 = _enc_step(x2, n2, s2[t], r2, o2, top, inv_freq)
                x3, n3 = _enc_step(x3, n3, s3[t], r3, o3, top, inv_freq)
        _enc_flush(out, lens, l0, x0, n0)
        _enc_flush(out, lens, l0 + 1, x1, n1)
        _enc_flush(out, lens, l0 + 2, x2, n2)
        _enc_flush(out, lens, l0 + 3, x3, n3)
    for lane in range(whole, num_lanes):
        x0 = np.int64(STATE_LOW)
        n0 = np.uint64(0)
        for cbase in range(cpl - 1, -1, -1):
            r0, s0 = cdf[lane * cpl + cbase], symct[lane * cpl + cbase]
            for t in range(num_tok - 1, -1, -1):
                x0, n0 = _enc_step(x0, n0, s0[t], r0, out[lane], top, inv_freq)
        _enc_flush(out, lens, lane, x0, n0)


@numba.njit(cache=True, nogil=True, inline="always")
def _load_channel(row, num_symbols, rows, lut, i):  # pragma: no cover - compiled
    """Copy a CDF row to rows[i * _ROW:] and fill its bucket table lut[i * _LUT:].

    rows[A] is set to 2**14 whatever the row says, so the decoder's search always
    stops inside the copy; expanded rows (fit.expand) hold 2**14 there anyway.
    """
    for s in range(num_symbols):
        rows[i * _ROW + s] = row[s]
    rows[i * _ROW + num_symbols] = PREC_TOTAL
    k = i * _LUT
    for s in range(num_symbols):
        end = i * _LUT + ((np.int64(rows[i * _ROW + s + 1]) + (1 << _LUT_SHIFT) - 1)
                          >> _LUT_SHIFT)
        while k < end:
            lut[k] = s
            k += 1


@numba.njit(cache=True, nogil=True, inline="always")
def _dec_step(x, p, rows, lut, i, words):  # pragma: no cover - compiled
    """Pop one symbol of group lane i; returns (symbol, state, word position)."""
    slot = x & _MASK
    s = np.uint64(lut[np.uint64(i * _LUT) + np.uint64(slot >> _LUT_SHIFT)]) + np.uint64(i * _ROW)
    s += np.uint64(rows[s + np.uint64(1)] <= slot)  # one boundary in the bucket
    while rows[s + np.uint64(1)] <= slot:  # more (tails only); rows[A] = 2**14 ends it
        s += np.uint64(1)
    start = np.int64(rows[s])
    x = (np.int64(rows[s + np.uint64(1)]) - start) * (x >> PREC_BITS) + slot - start
    # Renormalise branch-free (whether a word is due is data-dependent): always
    # load the next word (the words are padded, see decode_lanes), keep it if due.
    need = x < STATE_LOW
    word = np.int64(words[p])
    x = ((x << 16) | word) if need else x
    return np.int64(s) - i * _ROW, x, p + np.uint64(need)


@numba.njit(cache=True, nogil=True)
def decode_lanes(words, lane_start, lane_end, cdf, channels_per_lane, num_symbols,
                 symct):  # pragma: no cover - compiled
    """Decode all lanes into ``symct`` ``[C, T]`` uint8; returns False on a damaged stream.

    ``words`` must extend at least ``cpl * T + 2`` words past the last lane's end (a
    damaged lane reads on, at most one word per symbol, and is then rejected by the
    final check: a lane's word position only grows). ``num_symbols`` bounds every
    channel's alphabet. Lanes go in groups of four; a short last group decodes its
    last lane more than once.
    """
    num_ch, num_tok = symct.shape
    cpl = channels_per_lane
    num_lanes = num_ch // cpl
    for lane in range(num_lanes):
        if lane_end[lane] - lane_start[lane] < 2:
            return False
    rows = np.empty(_GROUP * _ROW, dtype=np.int32)
    lut = np.empty(_GROUP * _LUT, dtype=np.uint8)
    tmp = np.empty(_GROUP * num_tok, dtype=np.uint8)  # [T, 4]: one register addresses it
    ok = True
    for l0 in range(0, num_lanes, _GROUP):
        last = min(_GROUP, num_lanes - l0) - 1
        la, lb, lc, ld = l0, l0 + min(1, last), l0 + min(2, last), l0 + min(3, last)
        p0, p1 = np.uint64(lane_start[la]), np.uint64(lane_start[lb])
        p2, p3 = np.uint64(lane_start[lc]), np.uint64(lane_start[ld])
        x0 = (np.int64(words[p0]) << 16) | np.int64(words[p0 + np.uint64(1)])
        x1 = (np.int64(words[p1]) << 16) | np.int64(words[p1 + np.uint64(1)])
        x2 = (np.int64(words[p2]) << 16) | np.int64(words[p2 + np.uint64(1)])
        x3 = (np.int64(words[p3]) << 16) | np.int64(words[p3 + np.uint64(1)])
        p0, p1, p2, p3 = p0 + np.uint64(2), p1 + np.uint64(2), p2 + np.uint64(2), p3 + np.uint64(2)
        for cbase in range(cpl):
            for i in range(_GROUP):
                _load_channel(cdf[(l0 + min(i, last)) * cpl + cbase], num_symbols, rows, lut, i)
            for t in range(num_tok):
                s, x0, p0 = _dec_step(x0, p0, rows, lut, 0, words)
                tmp[4 * t] = s
                s, x1, p1 = _dec_step(x1, p1, rows, lut, 1, words)
                tmp[4 * t + 1] = s
                s, x2, p2 = _dec_step(x2, p2, rows, lut, 2, words)
                tmp[4 * t + 2] = s
                s, x3, p3 = _dec_step(x3, p3, rows, lut, 3, words)
                tmp[4 * t + 3] = s
            for i in range(last + 1):
                dst = symct[(l0 + i) * cpl + cbase]
                for t in range(num_tok):
                    dst[t] = tmp[4 * t + i]
        ok &= x0 == STATE_LOW and np.int64(p0) == lane_end[la]
        ok &= x1 == STATE_LOW and np.int64(p1) == lane_end[lb]
        ok &= x2 == STATE_LOW and np.int64(p2) == lane_end[lc]
        ok &= x3 == STATE_LOW and np.int64(p3) == lane_end[ld]
    return ok


def encode_section_lanes(symct: np.ndarray, cdf: np.ndarray, channels_per_lane: int
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Encode; returns (lane word counts ``[num_lanes]`` u16, concatenated words u16)."""
    num_ch, num_tok = symct.shape
    num_lanes = num_ch // channels_per_lane
    cap = channels_per_lane * num_tok + 2
    out = np.empty((num_lanes, cap), dtype=np.uint16)
    lens = np.empty(num_lanes, dtype=np.int64)
    encode_lanes(symct, cdf, channels_per_lane, out, lens, _INV_FREQ)
    words = np.empty(int(lens.sum()), dtype=np.uint16)
    _concat_lanes(out, lens, words)
    return lens.astype(np.uint16), words


@numba.njit(cache=True, nogil=True)
def _concat_lanes(out, lens, words):  # pragma: no cover - compiled
    """words = the tails ``out[l, cap - lens[l]:]`` of every lane, in lane order."""
    cap = out.shape[1]
    pos = 0
    for lane in range(out.shape[0]):
        n = lens[lane]
        words[pos : pos + n] = out[lane, cap - n :]
        pos += n


def decode_section_lanes(words: np.ndarray, lane_words: np.ndarray, cdf: np.ndarray,
                         channels_per_lane: int, num_tokens: int,
                         num_symbols: int = MAX_SYMBOLS) -> np.ndarray | None:
    """Decode to ``[C, T]`` uint8 symbols, or None if the stream is damaged."""
    ends = np.cumsum(lane_words.astype(np.int64))
    return decode_flat(words, ends - lane_words, ends, cdf, channels_per_lane, num_tokens,
                       num_symbols)


def decode_flat(words: np.ndarray, lane_start: np.ndarray, lane_end: np.ndarray,
                cdf: np.ndarray, channels_per_lane: int, num_tokens: int,
                num_symbols: int = MAX_SYMBOLS) -> np.ndarray | None:
    """Decode lanes given by word offsets (int64) into ``[C, T]`` uint8, or None if damaged."""
    if lane_start.size and (lane_start.min() < 0 or lane_end.max() > words.shape[0]):
        return None
    symct = np.empty((cdf.shape[0], num_tokens), dtype=np.uint8)
    padded = np.zeros(words.shape[0] + channels_per_lane * num_tokens + 2, dtype=np.uint16)
    padded[: words.shape[0]] = words
    ok = decode_lanes(padded, lane_start, lane_end, cdf, channels_per_lane, num_symbols, symct)
    return symct if ok else None
