"""The Triton kvq decode kernel against its reference, the numba CPU decoder.

Without a GPU the kernel runs under TRITON_INTERPRET=1 (set in conftest.py) on
small objects; on a GPU machine the same tests run natively on CUDA.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvstore import codec
from kvstore.codec import fit, gpu, rans
from kvstore.codec.kvq import decode_layers_f32, parse_kvq
from kvstore.errors import Corrupt
from kvstore.layout import KVLayout

from .conftest import synthetic_kv

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu = interpreted
LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, chunk_tokens=24)


def _object(level: str = "balanced", seed: int = 0, layout: KVLayout = LAYOUT) -> bytes:
    kv = synthetic_kv(layout.num_layers, layout.num_kv_heads, layout.chunk_tokens,
                      layout.head_dim, seed)
    return codec.encode(kv, layout, level)


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


def test_kernel_matches_reference_on_flat_lanes() -> None:
    from kvstore.kernels.kvq_decode import decode_lanes_reference, decode_lanes_triton

    rng = np.random.default_rng(2)
    sym = np.clip(np.rint(rng.laplace(5, 2, (24, 10))), 0, 10).astype(np.uint8)
    hist = np.stack([np.bincount(r, minlength=11) for r in sym]).astype(np.int64)
    _, _, cdf = fit.fit_and_expand(hist)
    lane_words, words = rans.encode_section_lanes(sym, cdf, 2)
    ends = torch.from_numpy(np.cumsum(lane_words.astype(np.int64)))
    starts = ends - torch.from_numpy(lane_words.astype(np.int64))
    args = (torch.from_numpy(words.astype(np.int32)), starts, ends, torch.from_numpy(cdf))
    got, ok = decode_lanes_triton(*(a.to(DEVICE) for a in args), 2, 10, block=4)
    ref, ref_ok = decode_lanes_reference(*args, 2, 10)
    assert ok and ref_ok
    assert torch.equal(got.cpu(), ref) and np.array_equal(ref.numpy(), sym)


def test_device_decode_close_to_cpu_decode() -> None:
    data = _object("high", seed=1)
    cpu = decode_layers_f32(parse_kvq(data), range(LAYOUT.num_layers))
    # codec.decode(device="cpu") takes the numba path, so call the device path itself.
    dev = gpu.decode_on_device(parse_kvq(data), range(LAYOUT.num_layers), DEVICE)
    assert dev.dtype == torch.float16 and tuple(dev.shape) == cpu.shape
    np.testing.assert_allclose(dev.float().cpu().numpy(), cpu, rtol=2e-3, atol=2e-3)
    layer1 = gpu.decode_on_device(parse_kvq(data), range(1, 2), DEVICE)[0]
    assert torch.equal(layer1.cpu(), dev[1].cpu())
    if DEVICE == "cuda":
        assert torch.equal(codec.decode(data, device="cuda")[1], layer1)


def test_device_decode_of_damaged_lane_raises_corrupt() -> None:
    data = bytearray(_object("aggressive", seed=2))
    data[-3] ^= 0x40  # a word of the last lane
    from kvstore.codec.format import compute_checksum

    data[40:48] = compute_checksum(bytes(data)).to_bytes(8, "little")
    with pytest.raises(Corrupt):
        gpu.decode_on_device(parse_kvq(bytes(data)), range(LAYOUT.num_layers), DEVICE)
