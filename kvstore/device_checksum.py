"""A checksum of bytes computed where they lie (CPU or GPU), identical on both.

The GPU tier cannot hash an object with XXH3 on the device, so next to each chunk
it keeps this cheaper sum, computed on the device when the chunk enters HBM (from
bytes already verified against their KVC1 XXH3). A same-host client that copies a
chunk device to device recomputes it over the bytes *as copied* and compares.

Definition, over little-endian uint32 words ``w_i`` (a tail of 1-3 bytes is
zero-padded into one last word) starting at word index ``s``:

    sum_i  w_i * (2 * (s + i) * 0x9E3779B9 + 1)    modulo 2**64

Every multiplier is odd, so a single flipped bit always changes the sum, and the
multipliers depend on the position, so swapped words do too. Integer addition
modulo 2**64 is associative, so torch's reductions give the same value on every
device and in any order; ``start_word`` lets a caller sum an object in pieces
(header from one buffer, payload from another) and add the parts.

torch is imported lazily: the client imports this module without loading torch
until it copies to a device.
"""

from __future__ import annotations

from typing import Any

MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B9
MULTIPLIER = 2 * _GOLDEN  # word i of an object is weighted by MULTIPLIER * i + 1


def checksum_reference(data: bytes | memoryview, start_word: int = 0) -> int:
    """The checksum in plain Python (slow; tests and tiny buffers only)."""
    raw = bytes(data)
    raw += b"\0" * (-len(raw) % 4)
    total = 0
    for i in range(len(raw) // 4):
        word = int.from_bytes(raw[4 * i : 4 * i + 4], "little")
        total += word * (2 * (start_word + i) * _GOLDEN + 1)
    return total & MASK64


def device_checksum(data: Any, start_word: int = 0) -> int:
    """The checksum of a 1-D uint8 torch tensor on any device (one sync to read it).

    Args:
        data: contiguous ``uint8`` tensor; its storage offset must be 4-byte aligned
            when its length is 4 bytes or more.
        start_word: word index of ``data[0]`` within the object being summed.
    """
    return int(device_checksum_tensor(data, start_word).item()) & MASK64


def device_checksum_tensor(data: Any, start_word: int = 0) -> Any:
    """Like ``device_checksum`` but returns a 0-d int64 tensor on ``data``'s device.

    Callers summing many chunks stack these and read them back with one transfer.
    """
    import torch

    if data.dtype != torch.uint8 or data.dim() != 1:
        raise TypeError(f"device_checksum wants a 1-D uint8 tensor, got {data.dtype} "
                        f"of {data.dim()} dims")
    num_full = data.numel() // 4 * 4
    words = data[:num_full].view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    if num_full < data.numel():
        tail = torch.zeros(4, dtype=torch.uint8, device=data.device)
        tail[: data.numel() - num_full] = data[num_full:]
        words = torch.cat([words, tail.view(torch.int32).to(torch.int64) & 0xFFFFFFFF])
    index = torch.arange(start_word, start_word + words.numel(), dtype=torch.int64,
                         device=data.device)
    # Wraps modulo 2**64 in int64, exactly like the reference's final mask.
    return (words * (index * (2 * _GOLDEN) + 1)).sum()
