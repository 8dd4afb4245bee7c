"""Low-rank key rebuild + RoPE: keys of selected blocks from the shadow factors.

Pre-RoPE keys of one layer are factored at prefill as ``K_pre ~= A @ B`` with
``A [tokens, R]`` (per-token coefficients) and ``B [R, Hkv * D]`` (orthonormal
rows). For block ``b`` of kv head ``h`` the kernel forms
``A[b*T:(b+1)*T] @ B[:, h*D:(h+1)*D]`` and rotates it to positions ``b*T + t``,
writing post-RoPE keys into the resident slot ``slots[h, i]`` (skipped if < 0).
"""

from __future__ import annotations

import torch
from kvstore.kernels.sparse_common import (
    FLOAT_DTYPES,
    check_same_device,
    check_tensor,
    next_pow2,
    require_triton,
    tl,
    triton,
)
from kvstore.kernels.sparse_gather import rope_rotate_reference

from kvstore.errors import InvalidArgument


def rebuild_reference(coeffs: torch.Tensor, basis: torch.Tensor, blocks: torch.Tensor,
                      slots: torch.Tensor, out: torch.Tensor,
                      rope: tuple[torch.Tensor, float]) -> None:
    """out ``[H, S, T, D]``; coeffs ``[tokens, R]``; basis ``[R, H*D]``; blocks/slots ``[H, K]``."""
    num_heads, _, block_tokens, dim = out.shape
    hs, idx = (slots >= 0).nonzero(as_tuple=True)
    if hs.numel() == 0:
        return
    blk = blocks[hs, idx].long()
    tok = blk[:, None] * block_tokens + torch.arange(block_tokens, device=out.device)  # [M, T]
    a = coeffs[tok].float()  # [M, T, R]
    b = basis.float().view(basis.shape[0], num_heads, dim)[:, hs].permute(1, 0, 2)  # [M, R, D]
    keys = torch.bmm(a, b)
    rows = rope_rotate_reference(keys, tok, *rope)
    out[hs, slots[hs, idx].long()] = rows.to(out.dtype)


if triton is not None:

    @triton.jit
    def _rebuild_kernel(a_ptr, b_ptr, blocks_ptr, slots_ptr, out_ptr, inv_ptr, scaling,
                        K, S, R, HD, T: tl.constexpr, HALF: tl.constexpr, BR: tl.constexpr):
        h = tl.program_id(0)
        i = tl.program_id(1)
        slot = tl.load(slots_ptr + h * K + i)
        if slot >= 0:
            blk = tl.load(blocks_ptr + h * K + i).to(tl.int64)
            t = tl.arange(0, T)
            r = tl.arange(0, BR)
            j = tl.arange(0, HALF)
            tok = blk * T + t
            a = tl.load(a_ptr + tok[:, None] * R + r[None, :], mask=r[None, :] < R, other=0.0)
            col = h * 2 * HALF + j[None, :]
            b1 = tl.load(b_ptr + r[:, None] * HD + col, mask=r[:, None] < R, other=0.0)
            b2 = tl.load(b_ptr + r[:, None] * HD + col + HALF, mask=r[:, None] < R, other=0.0)
            a = a.to(tl.float32)[:, :, None]
            x1 = tl.sum(a * b1.to(tl.float32)[None, :, :], axis=1)  # [T, HALF]
            x2 = tl.sum(a * b2.to(tl.float32)[None, :, :], axis=1)
            ang = tok.to(tl.float32)[:, None] * tl.load(inv_ptr + j)[None, :]
            c = tl.cos(ang) * scaling
            s = tl.sin(ang) * scaling
            dst = out_ptr + (h * S + slot) * T * 2 * HALF + t[:, None] * (2 * HALF) + j[None, :]
            tl.store(dst, (x1 * c - x2 * s).to(out_ptr.dtype.element_ty))
            tl.store(dst + HALF, (x2 * c + x1 * s).to(out_ptr.dtype.element_ty))


def rebuild_triton(coeffs: torch.Tensor, basis: torch.Tensor, blocks: torch.Tensor,
                   slots: torch.Tensor, out: torch.Tensor,
                   rope: tuple[torch.Tensor, float]) -> None:
    """Triton version of :func:`rebuild_reference` (one program per (head, block))."""
    check_tensor("out", out, ndim=4, dtypes=FLOAT_DTYPES)
    num_heads, num_slots, block_tokens, dim = out.shape
    check_tensor("coeffs", coeffs, ndim=2, dtypes=FLOAT_DTYPES)
    rank = coeffs.shape[1]
    check_tensor("basis", basis, ndim=2, dtypes=FLOAT_DTYPES, shape=(rank, num_heads * dim))
    check_tensor("blocks", blocks, ndim=2, dtypes=(torch.int64,), shape=(num_heads, None))
    check_tensor("slots", slots, ndim=2, dtypes=(torch.int64,), shape=tuple(blocks.shape))
    if dim % 2 or dim & (dim - 1) or block_tokens & (block_tokens - 1):
        raise InvalidArgument(f"head_dim {dim} and block_tokens {block_tokens} must be powers of 2")
    check_same_device(coeffs=coeffs, basis=basis, blocks=blocks, slots=slots, out=out)
    require_triton(out)
    inv_freq = rope[0].to(device=out.device, dtype=torch.float32).contiguous()
    if blocks.shape[1] == 0:
        return
    _rebuild_kernel[(num_heads, blocks.shape[1])](
        coeffs, basis, blocks, slots, out, inv_freq, float(rope[1]), blocks.shape[1], num_slots,
        rank, num_heads * dim, T=block_tokens, HALF=dim // 2, BR=next_pow2(rank))


def rebuild(coeffs: torch.Tensor, basis: torch.Tensor, blocks: torch.Tensor, slots: torch.Tensor,
            out: torch.Tensor, rope: tuple[torch.Tensor, float]) -> None:
    """Dispatch: the Triton kernel on CUDA, the PyTorch reference elsewhere."""
    if out.is_cuda and triton is not None:
        rebuild_triton(coeffs, basis, blocks, slots, out, rope)
    else:
        rebuild_reference(coeffs, basis, blocks, slots, out, rope)
