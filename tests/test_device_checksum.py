"""The device checksum: torch's value equals the reference's, in pieces too; bit flips show."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvstore.device_checksum import checksum_reference, device_checksum


@pytest.mark.parametrize("length", [0, 1, 3, 4, 5, 63, 1000, 4099])
def test_torch_sum_equals_reference_when_lengths_vary(length):
    data = np.random.default_rng(length).integers(0, 256, length, dtype=np.uint8).tobytes()
    tensor = torch.frombuffer(bytearray(data), dtype=torch.uint8) if length else torch.empty(
        0, dtype=torch.uint8)
    assert device_checksum(tensor, start_word=7) == checksum_reference(data, start_word=7)


def test_sum_of_pieces_equals_sum_of_the_whole():
    data = np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8)
    whole = device_checksum(torch.from_numpy(data))
    head, tail = torch.from_numpy(data[:1024]), torch.from_numpy(data[1024:])
    assert (device_checksum(head) + device_checksum(tail, 256)) % (1 << 64) == whole


def test_wraps_modulo_2_64_like_the_reference():
    data = b"\xff" * 400_000  # the int64 accumulator overflows many times
    assert device_checksum(torch.frombuffer(bytearray(data), dtype=torch.uint8)) == \
        checksum_reference(data)


def test_a_flipped_bit_or_swapped_words_change_the_sum():
    data = bytearray(np.random.default_rng(2).integers(0, 256, 256, dtype=np.uint8).tobytes())
    base = checksum_reference(data)
    for offset in (0, 17, 255):
        flipped = bytearray(data)
        flipped[offset] ^= 0x80
        assert checksum_reference(flipped) != base
    swapped = data[4:8] + data[0:4] + data[8:]
    assert data[0:4] == data[4:8] or checksum_reference(swapped) != base
