"""Layer-wise delivery: layer l reaches the caller before later layers leave the daemon."""

from __future__ import annotations

import time

import numpy as np
import pytest

from kvstore.server import get
from tests.conftest import make_kv, make_tokens

DELAY_S = 0.15  # the slowed daemon waits this long before producing each later layer


@pytest.fixture
def slow_layers(monkeypatch):
    """Slow the daemon's layer-major stream and record when each layer starts leaving it."""
    produced: dict[int, float] = {}
    original = get._layer_message

    def delayed(raws, first, layer, num_chunks):
        if first == 0:
            if layer > 0:
                time.sleep(DELAY_S)  # a slow producer between layers
            produced[layer] = time.monotonic()
        return original(raws, first, layer, num_chunks)

    monkeypatch.setattr(get, "_layer_message", delayed)
    return produced


def test_layer_is_yielded_before_later_layers_are_sent(client, layout, slow_layers):
    tokens, kv = make_tokens(48), make_kv(layout, 48)
    c = client(transport="stream")  # the arena path copies everything before yielding
    c.put(tokens, kv)
    yielded: dict[int, float] = {}
    for layer, arr in c.get_layers(tokens, as_numpy=True):
        yielded[layer] = time.monotonic()
        assert np.array_equal(arr, kv[layer])
    assert list(yielded) == list(range(layout.num_layers))
    for layer in range(layout.num_layers - 1):
        # The caller had layer l while the daemon had not yet produced layer l + 1.
        assert yielded[layer] < slow_layers[layer + 1], (yielded, slow_layers)
