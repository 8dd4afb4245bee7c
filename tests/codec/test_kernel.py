"""The Triton kvq decode kernels and the batched device decoder against the CPU decoder.

Without a GPU the kernels run under TRITON_INTERPRET=1 (set in conftest.py) on
small objects; on a GPU machine the same tests run natively on CUDA.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from kvstore import codec
from kvstore.codec import dist, fit, gpu, rans
from kvstore.codec.calibrate import make_table, normalise_weights
from kvstore.codec.format import compute_checksum
from kvstore.codec.kvq import decode_layers_f32, parse_kvq
from kvstore.errors import Corrupt, InvalidArgument
from kvstore.layout import KVLayout

from .conftest import synthetic_kv

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu = interpreted
LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, chunk_tokens=24)
TOL = {"rtol": 2e-3, "atol": 2e-3}  # fp16 output vs the CPU decoder's float32


def _object(level: str = "balanced", seed: int = 0, layout: KVLayout = LAYOUT,
            **kwargs: object) -> bytes:
    kv = synthetic_kv(layout.num_layers, layout.num_kv_heads, layout.chunk_tokens,
                      layout.head_dim, seed)
    return codec.encode(kv.astype(layout.dtype), layout, level, **kwargs)


def _calibrated(seed: int) -> bytes:
    """Per-layer bins and query-weighted key steps (a wider key alphabet)."""
    weights = np.random.default_rng(seed).uniform(0.1, 3.0, (LAYOUT.num_layers, 32))
    table = make_table("toy", LAYOUT, 1, {"k": [0.02, 0.001], "v": [0.001, 0.003]},
                       normalise_weights(weights))
    return _object("compact", seed, table=table)


def _refresh_checksum(data: bytearray) -> bytes:
    data[40:48] = compute_checksum(bytes(data)).to_bytes(8, "little")
    return bytes(data)


def _section_offset(data: bytes, index: int) -> int:
    """Byte offset of a section in the object (sections are its last bytes)."""
    return len(data) - sum(s.nbytes for s in parse_kvq(data).sections[index:])


@pytest.mark.parametrize("level", ["near-lossless", "aggressive"])
def test_kernel_symbols_bit_identical_to_cpu_decoder(level: str) -> None:
    obj = parse_kvq(_object(level))
    views, symbols = gpu.decode_symbols(obj, range(LAYOUT.num_layers), DEVICE)
    for i, view in enumerate(views):
        cdf = fit.expand(view.mu, view.shape_scale, view.num_symbols)
        ref = rans.decode_section_lanes(view.words, view.lane_words, cdf,
                                        view.channels_per_lane, LAYOUT.chunk_tokens)
        assert ref is not None
        np.testing.assert_array_equal(symbols[i].cpu().numpy(), ref)


def test_kernel_matches_reference_on_flat_lanes_in_both_layouts() -> None:
    from kvstore.kernels.kvq_decode import decode_lanes_triton, launch_decode_lanes

    from kvstore.codec.gpu import decode_lanes_on_cpu

    rng = np.random.default_rng(2)
    sym = np.clip(np.rint(rng.laplace(5, 2, (24, 10))), 0, 10).astype(np.uint8)
    hist = np.stack([np.bincount(r, minlength=11) for r in sym]).astype(np.int64)
    _, _, cdf = fit.fit_and_expand(hist)
    lane_words, words = rans.encode_section_lanes(sym, cdf, 2)
    ends = torch.from_numpy(np.cumsum(lane_words.astype(np.int64)))
    starts = ends - torch.from_numpy(lane_words.astype(np.int64))
    args = (torch.from_numpy(words.astype(np.int32)), starts, ends, torch.from_numpy(cdf))
    got, ok = decode_lanes_triton(*(a.to(DEVICE) for a in args), 2, 10, block=4)
    ref, ref_ok = decode_lanes_on_cpu(*args, 2, 10)
    assert ok and ref_ok
    assert torch.equal(got.cpu(), ref) and np.array_equal(ref.numpy(), sym)
    # u16 words as int16 bits, int16 CDFs, symbols in [C // D, T, D] order (D = 4).
    small = (torch.from_numpy(words.view(np.int16)), starts, ends,
             torch.from_numpy(cdf.astype(np.int16)))
    flat, lane_ok = launch_decode_lanes(*(a.to(DEVICE) for a in small), 2, 10, out_dim=4,
                                        block=8)
    assert bool(lane_ok.all())
    want = sym.reshape(6, 4, 10).transpose(0, 2, 1)
    np.testing.assert_array_equal(flat.cpu().numpy().reshape(6, 10, 4), want)


@pytest.mark.parametrize("alphabet", [2, dist.MAX_SYMBOLS])
def test_kernel_search_covers_the_whole_alphabet(alphabet: int) -> None:
    """Every symbol of the smallest and the largest alphabet, first and last included."""
    from kvstore.kernels.kvq_decode import launch_decode_lanes

    rng = np.random.default_rng(alphabet)
    sym = rng.integers(0, alphabet, (8, 20)).astype(np.uint8)
    sym[:, 0], sym[:, 1] = 0, alphabet - 1
    hist = np.stack([np.bincount(r, minlength=alphabet) for r in sym]).astype(np.int64)
    _, _, cdf = fit.fit_and_expand(hist)
    lane_words, words = rans.encode_section_lanes(sym, cdf, 2)
    ends = np.cumsum(lane_words.astype(np.int64))
    args = [torch.from_numpy(a).to(DEVICE) for a in
            (words.view(np.int16), ends - lane_words, ends, cdf.astype(np.int16))]
    got, ok = launch_decode_lanes(*args, 2, 20, block=4)
    assert bool(ok.all())
    np.testing.assert_array_equal(got.cpu().numpy().reshape(8, 20), sym)


def test_cdf_kernel_matches_integer_expansion() -> None:
    from kvstore.kernels.kvq_decode import expand_cdfs

    rng = np.random.default_rng(3)
    n = 100
    mu, ss = (rng.integers(0, 256, n).astype(np.uint8) for _ in range(2))
    bins = rng.integers(2, dist.MAX_SYMBOLS + 1, n).astype(np.uint8)
    bins[:4] = [2, 3, dist.MAX_SYMBOLS, dist.MAX_SYMBOLS - 1]
    ref = dist.expand_cdf(np, dist.WEIGHTS, mu, ss, bins.astype(np.int64))
    for dtype in (torch.int16, torch.int32):
        got = expand_cdfs(*(torch.from_numpy(a).to(DEVICE) for a in (mu, ss, bins)),
                          dist.WEIGHTS, dtype)
        assert got.dtype == dtype
        np.testing.assert_array_equal(got.cpu().numpy().astype(np.int32), ref)


def test_device_decode_close_to_cpu_decode() -> None:
    data = _object("high", seed=1)
    cpu = decode_layers_f32(parse_kvq(data), range(LAYOUT.num_layers))
    # codec.decode(device="cpu") takes the numba path, so call the device path itself.
    dev = gpu.decode_on_device(parse_kvq(data), range(LAYOUT.num_layers), DEVICE)
    assert dev.dtype == torch.float16 and tuple(dev.shape) == cpu.shape
    np.testing.assert_allclose(dev.float().cpu().numpy(), cpu, **TOL)
    layer1 = gpu.decode_on_device(parse_kvq(data), range(1, 2), DEVICE)[0]
    assert torch.equal(layer1.cpu(), dev[1].cpu())
    if DEVICE == "cuda":
        assert torch.equal(codec.decode(data, device="cuda")[1], layer1)


def test_batched_decode_of_mixed_objects_matches_cpu_decoder() -> None:
    """Levels, a calibrated object, layer ranges, another token count in float32 and
    an unrotated head_dim in one call: three groups, each one CDF launch and one lane
    launch."""
    f32 = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, chunk_tokens=16, dtype="float32")
    plain = KVLayout(num_layers=1, num_kv_heads=2, head_dim=12, chunk_tokens=16)
    blobs = [_object("near-lossless", 4), _object("aggressive", 5), _calibrated(6),
             _object("balanced", 7, f32), _object("high", 8), _object("compact", 9, plain)]
    layers = [range(2), range(1, 2), range(2), range(0, 1), range(0), range(1)]
    out = gpu.decode_many_on_device([parse_kvq(b) for b in blobs], DEVICE, layers)
    assert len(out) == len(blobs)
    for data, r, got in zip(blobs, layers, out, strict=True):
        obj = parse_kvq(data)
        want = decode_layers_f32(obj, r)
        assert tuple(got.shape) == want.shape
        assert str(got.dtype) == f"torch.{obj.header.dtype}"
        np.testing.assert_allclose(got.float().cpu().numpy(), want, **TOL)
    # The whole batch decodes as each object alone (keys are elementwise: equal bits).
    alone = gpu.decode_on_device(parse_kvq(blobs[2]), range(2), DEVICE)
    assert torch.equal(alone[:, 0], out[2][:, 0])
    torch.testing.assert_close(alone, out[2])


def test_device_decode_of_damaged_lane_raises_corrupt() -> None:
    data = bytearray(_object("aggressive", seed=2))
    data[-3] ^= 0x40  # a word of the last lane
    damaged = _refresh_checksum(data)
    with pytest.raises(Corrupt):
        gpu.decode_on_device(parse_kvq(damaged), range(LAYOUT.num_layers), DEVICE)
    batch = [parse_kvq(_object("high", 9)), parse_kvq(damaged)]
    with pytest.raises(Corrupt, match="object 1: entropy-coded stream"):
        gpu.decode_many_on_device(batch, DEVICE)


def test_forged_scale_overflowing_the_dtype_raises_corrupt_as_on_cpu() -> None:
    data = bytearray(_object("balanced", seed=11))
    start = _section_offset(bytes(data), 2)  # layer 1 keys: base at byte 4 of the section
    data[start + 4 : start + 8] = struct.pack("<f", 1e29)
    forged = _refresh_checksum(data)
    with pytest.raises(Corrupt):
        decode_layers_f32(parse_kvq(forged), range(2))
    batch = [parse_kvq(_object("high", 12)), parse_kvq(forged)]
    with pytest.raises(Corrupt, match="object 1: decoded values overflow float16"):
        gpu.decode_many_on_device(batch, DEVICE)
    assert gpu.decode_many_on_device(batch, DEVICE, [range(2), range(1)])[1].shape[0] == 1


def test_batched_decode_rejects_bad_layer_ranges() -> None:
    obj = parse_kvq(_object("aggressive", seed=13))
    with pytest.raises(InvalidArgument):
        gpu.decode_many_on_device([obj], DEVICE, range(1, 3))
    with pytest.raises(InvalidArgument):
        gpu.decode_many_on_device([obj, obj], DEVICE, [range(2)])


def test_decode_many_batches_kvq_objects_and_passes_raw_ones_through() -> None:
    from kvstore.codec.api import _decode_batched

    objs = [_object("near-lossless", 1), _object("raw", 2), _object("aggressive", 3)]
    want = codec.decode_many(objs)  # the CPU decoder, one object at a time
    assert [w.shape for w in want] == [codec.decode(o).shape for o in objs]
    got = _decode_batched(objs, DEVICE)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.cpu().float(), w.float(), **TOL)
    assert torch.equal(got[1].cpu(), want[1])  # raw: the stored bits
    bad = bytearray(objs[2])
    bad[-3] ^= 0xFF
    with pytest.raises(Corrupt):
        _decode_batched([objs[0], bytes(bad)], DEVICE)
