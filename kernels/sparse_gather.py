"""Gather of selected blocks from a flat host (or mapped-arena) buffer into resident slots.

``src`` is a 1-D tensor over the whole store (the mapped DRAM arena, or an
in-process pool); ``offsets[h, b]`` is the element offset of block ``b`` of kv
head ``h`` in it (``T * D`` contiguous elements). Rows with ``slots[h, i] < 0``
are hits and are skipped. With ``rope`` set the block is taken to be pre-RoPE
keys and rotated to positions ``b * T + t`` on the way (exact-key layers).
"""

from __future__ import annotations

import torch
from kvstore.kernels.sparse_common import (
    FLOAT_DTYPES,
    check_same_device,
    check_tensor,
    require_triton,
    tl,
    triton,
)

from kvstore.errors import InvalidArgument
from kvstore.models.rope import rotate


def rope_rotate_reference(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                          scaling: float) -> torch.Tensor:
    """The kernels' RoPE in PyTorch: ``kvstore.models.rope.rotate`` (Llama rotate-half form of
    ``x [..., D]`` at ``positions``, in float32)."""
    return rotate(x, positions, inv_freq, scaling)


def gather_reference(src: torch.Tensor, offsets: torch.Tensor, blocks: torch.Tensor,
                     slots: torch.Tensor, out: torch.Tensor,
                     rope: tuple[torch.Tensor, float] | None = None) -> None:
    """out ``[H, S, T, D]``: ``out[h, slots[h,i]] = src[offsets[h, blocks[h,i]] :][:T*D]``."""
    _, _, block_tokens, dim = out.shape
    hs, idx = (slots >= 0).nonzero(as_tuple=True)
    if hs.numel() == 0:
        return
    blk = blocks[hs, idx].long()
    starts = offsets[hs, blk].long()
    span = torch.arange(block_tokens * dim, device=src.device)
    rows = src[starts[:, None] + span[None, :]].view(-1, block_tokens, dim)
    if rope is not None:
        pos = blk[:, None] * block_tokens + torch.arange(block_tokens, device=src.device)
        rows = rope_rotate_reference(rows, pos, *rope)
    out[hs, slots[hs, idx].long()] = rows.to(out.dtype)


if triton is not None:

    @triton.jit
    def _gather_kernel(src_ptr, off_ptr, blocks_ptr, slots_ptr, out_ptr, inv_ptr, scaling,
                       K, S, NB, T: tl.constexpr, HALF: tl.constexpr, ROPE: tl.constexpr):
        h = tl.program_id(0)
        i = tl.program_id(1)
        slot = tl.load(slots_ptr + h * K + i)
        if slot >= 0:
            blk = tl.load(blocks_ptr + h * K + i)
            start = tl.load(off_ptr + h * NB + blk).to(tl.int64)
            t = tl.arange(0, T)
            j = tl.arange(0, HALF)
            rows = start + t[:, None] * (2 * HALF) + j[None, :]
            x1 = tl.load(src_ptr + rows).to(tl.float32)
            x2 = tl.load(src_ptr + rows + HALF).to(tl.float32)
            if ROPE:
                pos = (blk * T + t).to(tl.float32)
                ang = pos[:, None] * tl.load(inv_ptr + j)[None, :]
                c = tl.cos(ang) * scaling
                s = tl.sin(ang) * scaling
                x1, x2 = x1 * c - x2 * s, x2 * c + x1 * s
            dst = out_ptr + (h * S + slot) * T * 2 * HALF + t[:, None] * (2 * HALF) + j[None, :]
            tl.store(dst, x1.to(out_ptr.dtype.element_ty))
            tl.store(dst + HALF, x2.to(out_ptr.dtype.element_ty))


def gather_triton(src: torch.Tensor, offsets: torch.Tensor, blocks: torch.Tensor,
                  slots: torch.Tensor, out: torch.Tensor,
                  rope: tuple[torch.Tensor, float] | None = None) -> None:
    """Triton version of :func:`gather_reference` (one program per (head, selected block))."""
    check_tensor("out", out, ndim=4, dtypes=FLOAT_DTYPES)
    num_heads, num_slots, block_tokens, dim = out.shape
    check_tensor("src", src, ndim=1, dtypes=FLOAT_DTYPES)
    check_tensor("offsets", offsets, ndim=2, dtypes=(torch.int64,), shape=(num_heads, None))
    check_tensor("blocks", blocks, ndim=2, dtypes=(torch.int64,), shape=(num_heads, None))
    check_tensor("slots", slots, ndim=2, dtypes=(torch.int64,), shape=tuple(blocks.shape))
    if dim % 2 or dim & (dim - 1) or block_tokens & (block_tokens - 1):
        raise InvalidArgument(f"head_dim {dim} and block_tokens {block_tokens} must be powers of 2")
    if src.device != out.device and not (out.is_cuda and src.is_pinned()):
        # A pinned (cudaHostRegister'ed) host buffer is device-addressable through UVA:
        # that is how the mapped DRAM arena is read without a copy first.
        raise InvalidArgument(f"src on {src.device} is neither on {out.device} nor pinned")
    check_same_device(offsets=offsets, blocks=blocks, slots=slots, out=out)
    require_triton(out)
    inv_freq, scaling = rope if rope is not None else (torch.zeros(dim // 2), 1.0)
    inv_freq = inv_freq.to(device=out.device, dtype=torch.float32).contiguous()
    if blocks.shape[1] == 0:
        return
    _gather_kernel[(num_heads, blocks.shape[1])](
        src, offsets, blocks, slots, out, inv_freq, float(scaling), blocks.shape[1], num_slots,
        offsets.shape[1], T=block_tokens, HALF=dim // 2, ROPE=rope is not None)


def gather(src: torch.Tensor, offsets: torch.Tensor, blocks: torch.Tensor, slots: torch.Tensor,
           out: torch.Tensor, rope: tuple[torch.Tensor, float] | None = None) -> None:
    """Dispatch: the Triton kernel on CUDA, the PyTorch reference elsewhere."""
    if out.is_cuda and triton is not None:
        gather_triton(src, offsets, blocks, slots, out, rope)
    else:
        gather_reference(src, offsets, blocks, slots, out, rope)
