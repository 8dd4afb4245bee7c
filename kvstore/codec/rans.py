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
vectorise; interpreted Python runs it at ~1 MB/s, numba at ~300 MB/s per core
(DESIGN §3). ``constriction`` is the reference the tests compare sizes against.
"""

from __future__ import annotations

import numba
import numpy as np

from kvstore.codec.dist import MAX_SYMBOLS, PREC_BITS, PREC_TOTAL

STATE_LOW = 1 << 16  # lower bound of the normalised state
_MASK = (1 << PREC_BITS) - 1
assert MAX_SYMBOLS == 128, "the unrolled binary search below assumes 128-entry CDF rows"


# 1/f for every frequency: the encoder's division x // f becomes a float64 multiply
# plus an exact integer correction (64-bit division costs ~40 cycles).
_INV_FREQ = 1.0 / np.maximum(np.arange(PREC_TOTAL + 1, dtype=np.float64), 1.0)


@numba.njit(cache=True, nogil=True)
def encode_lanes(symct, cdf, channels_per_lane, out, lens, inv_freq):  # pragma: no cover
    """Encode ``symct`` ``[C, T]`` uint8 with per-channel ``cdf`` ``[C, MAX_SYMBOLS + 1]`` int32.

    ``out`` is scratch ``[num_lanes, cpl * T + 2]`` uint16; lane ``l``'s words end up in
    ``out[l, cap - lens[l]:]`` in decoder order. States are int64 (they stay < 2**32):
    numba turns mixed signed/unsigned arithmetic into float64. Lanes advance in
    lock-step so their divisions overlap.
    """
    num_ch, num_tok = symct.shape
    cap = out.shape[1]
    num_lanes = num_ch // channels_per_lane
    x = np.full(num_lanes, STATE_LOW, dtype=np.int64)
    n = np.zeros(num_lanes, dtype=np.int64)
    for cbase in range(channels_per_lane - 1, -1, -1):
        for t in range(num_tok - 1, -1, -1):
            for lane in range(num_lanes):
                c = lane * channels_per_lane + cbase
                s = np.int64(symct[c, t])
                start = np.int64(cdf[c, s])
                f = np.int64(cdf[c, s + 1]) - start
                xl = x[lane]
                if xl >= (f << (32 - PREC_BITS)):
                    out[lane, cap - 1 - n[lane]] = xl & 0xFFFF
                    n[lane] += 1
                    xl >>= 16
                q = np.int64(np.float64(xl) * inv_freq[f])
                r = xl - q * f
                if r < 0:
                    q -= 1
                    r += f
                elif r >= f:
                    q += 1
                    r -= f
                x[lane] = (q << PREC_BITS) + r + start
    for lane in range(num_lanes):
        out[lane, cap - 1 - n[lane]] = x[lane] & 0xFFFF
        out[lane, cap - 2 - n[lane]] = x[lane] >> 16
        lens[lane] = n[lane] + 2


@numba.njit(cache=True, nogil=True, inline="always")
def _find_symbol(row, slot, first_step):  # pragma: no cover - compiled
    # Largest s with row[s] <= slot; rows are padded with 2**14 > slot, and
    # 2 * first_step >= A. Branch-free: the comparisons are data-dependent.
    # (the first_step tests are the same for every symbol: perfectly predicted).
    s = 0
    if first_step >= 64:
        s += np.int64(row[s + 64] <= slot) << 6
    if first_step >= 32:
        s += np.int64(row[s + 32] <= slot) << 5
    if first_step >= 16:
        s += np.int64(row[s + 16] <= slot) << 4
    if first_step >= 8:
        s += np.int64(row[s + 8] <= slot) << 3
    if first_step >= 4:
        s += np.int64(row[s + 4] <= slot) << 2
    if first_step >= 2:
        s += np.int64(row[s + 2] <= slot) << 1
    s += np.int64(row[s + 1] <= slot)
    return s


@numba.njit(cache=True, nogil=True)
def decode_lanes(words, lane_start, lane_end, cdf, channels_per_lane, num_symbols,
                 symct):  # pragma: no cover - compiled
    """Decode all lanes into ``symct`` ``[C, T]`` uint8; returns False on a damaged stream.

    ``num_symbols`` bounds every channel's alphabet (it sets the search depth).

    Lanes advance in lock-step (inner loop over lanes) so the CPU overlaps their
    independent dependency chains.
    """
    num_ch, num_tok = symct.shape
    num_lanes = num_ch // channels_per_lane
    first_step = 1  # binary search over the largest alphabet of any channel
    while 2 * first_step < num_symbols:
        first_step *= 2
    x = np.empty(num_lanes, dtype=np.int64)
    pos = np.empty(num_lanes, dtype=np.int64)
    for lane in range(num_lanes):
        p = lane_start[lane]
        if lane_end[lane] - p < 2:
            return False
        x[lane] = (np.int64(words[p]) << 16) | np.int64(words[p + 1])
        pos[lane] = p + 2
    bad = np.int64(0)
    for cbase in range(channels_per_lane):
        for t in range(num_tok):
            for lane in range(num_lanes):
                c = lane * channels_per_lane + cbase
                row = cdf[c]
                xl = x[lane]
                slot = xl & _MASK
                s = _find_symbol(row, slot, first_step)
                start = np.int64(row[s])
                xl = (np.int64(row[s + 1]) - start) * (xl >> PREC_BITS) + slot - start
                # Branch-free renormalisation (whether a word is due is data-dependent):
                # always load the next word (clamped to the lane), keep it only if due.
                need = np.int64(xl < STATE_LOW)
                p = pos[lane]
                last = lane_end[lane] - 1
                word = np.int64(words[min(p, last)])
                bad |= need & np.int64(p > last)
                x[lane] = (xl << (need << 4)) | (word & -need)
                pos[lane] = p + need
                symct[c, t] = s
    if bad:
        return False
    for lane in range(num_lanes):
        if x[lane] != STATE_LOW or pos[lane] != lane_end[lane]:
            return False
    return True


def encode_section_lanes(symct: np.ndarray, cdf: np.ndarray, channels_per_lane: int
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Encode; returns (lane word counts ``[num_lanes]`` u16, concatenated words u16)."""
    num_ch, num_tok = symct.shape
    num_lanes = num_ch // channels_per_lane
    cap = channels_per_lane * num_tok + 2
    out = np.empty((num_lanes, cap), dtype=np.uint16)
    lens = np.empty(num_lanes, dtype=np.int64)
    encode_lanes(symct, cdf, channels_per_lane, out, lens, _INV_FREQ)
    words = np.concatenate([out[i, cap - lens[i]:] for i in range(num_lanes)])
    return lens.astype(np.uint16), words


def decode_section_lanes(words: np.ndarray, lane_words: np.ndarray, cdf: np.ndarray,
                         channels_per_lane: int, num_tokens: int,
                         num_symbols: int = MAX_SYMBOLS) -> np.ndarray | None:
    """Decode to ``[C, T]`` uint8 symbols, or None if the stream is damaged."""
    ends = np.cumsum(lane_words.astype(np.int64))
    starts = ends - lane_words
    symct = np.empty((cdf.shape[0], num_tokens), dtype=np.uint8)
    ok = decode_lanes(words, starts, ends, cdf, channels_per_lane, num_symbols, symct)
    return symct if ok else None
