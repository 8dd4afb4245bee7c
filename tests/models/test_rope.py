"""RoPE outside the model: moved keys equal the model's own; unhandled rope types refused."""

from __future__ import annotations

import pytest
import torch

from kvstore.errors import InvalidArgument
from kvstore.models.rope import rope_spec, rotate, rotate_keys
from tests.models import tiny_llama


def test_rotate_keys_moves_cached_keys_to_the_positions_the_model_computes():
    model = tiny_llama()
    spec = rope_spec(model)
    ids = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        alone = model(input_ids=ids, use_cache=True).cache.layers[0].keys  # positions 0..23
        shifted = model(input_ids=torch.cat((ids[:, :1], ids), 1), use_cache=True).cache
    at_zero = rotate_keys(alone, spec, torch.arange(24), inverse=True)
    moved = rotate_keys(at_zero, spec, torch.arange(1, 25))
    # Layer 0 keys depend only on token and position: moved keys equal the model's own.
    torch.testing.assert_close(moved, shifted.layers[0].keys[:, :, 1:], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
        {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
    ],
)
def test_rope_spec_rejects_length_dependent_or_partial_rope(rope):
    with pytest.raises(InvalidArgument, match="rope|rotary"):
        rope_spec(tiny_llama(rope))


def test_rotate_with_scaling_and_inverse_round_trips_in_float32():
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(4))
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    positions = torch.arange(5)
    back = rotate(rotate(x, positions, inv_freq), positions, inv_freq, inverse=True)
    torch.testing.assert_close(back, x, atol=1e-5, rtol=0)
    scaled = rotate(x, positions, inv_freq, scaling=2.0)
    torch.testing.assert_close(scaled, 2.0 * rotate(x, positions, inv_freq))
