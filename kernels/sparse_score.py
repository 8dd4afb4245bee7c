"""Chunk scoring: for each (kv head, block) the max over the GQA group of the
log-sum-exp of ``q . k * scale`` over the block's keys.

With one key per block (a landmark) this is the plain scaled dot product; with
the rebuilt low-rank keys of a block it estimates log(attention mass) of the
block, which is what top-k should rank by.
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

from kvstore.errors import InvalidArgument


def block_scores_reference(q: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """q ``[Hq, D]``, keys ``[Hkv, N, T, D]`` -> scores ``[Hkv, N]`` float32."""
    num_kv, _, _, dim = keys.shape
    qg = q.float().view(num_kv, q.shape[0] // num_kv, dim)
    logits = torch.einsum("hgd,hntd->hgnt", qg, keys.float()) * scale
    return torch.logsumexp(logits, dim=-1).amax(dim=1)


if triton is not None:

    @triton.jit
    def _block_scores_kernel(q_ptr, k_ptr, out_ptr, N, scale,
                             G: tl.constexpr, T: tl.constexpr, D: tl.constexpr,
                             BG: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
        h = tl.program_id(0)
        n = tl.program_id(1)
        g = tl.arange(0, BG)
        t = tl.arange(0, BT)
        d = tl.arange(0, BD)
        q_mask = (g[:, None] < G) & (d[None, :] < D)
        q = tl.load(q_ptr + (h * G + g[:, None]) * D + d[None, :], mask=q_mask, other=0.0)
        k_mask = (t[:, None] < T) & (d[None, :] < D)
        k_base = k_ptr + (h * N + n) * T * D
        k = tl.load(k_base + t[:, None] * D + d[None, :], mask=k_mask, other=0.0)
        logits = tl.sum(q.to(tl.float32)[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)
        logits = tl.where(t[None, :] < T, logits * scale, float("-inf"))  # [BG, BT]
        m = tl.max(logits, axis=1)
        lse = m + tl.log(tl.sum(tl.exp(logits - m[:, None]), axis=1))
        lse = tl.where(g < G, lse, float("-inf"))
        tl.store(out_ptr + h * N + n, tl.max(lse, axis=0))


def block_scores_triton(q: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """Triton version of :func:`block_scores_reference` (one program per (head, block))."""
    check_tensor("keys", keys, ndim=4, dtypes=FLOAT_DTYPES)
    num_kv, num_blocks, block_tokens, dim = keys.shape
    check_tensor("q", q, ndim=2, dtypes=FLOAT_DTYPES, shape=(None, dim))
    if q.shape[0] % num_kv:
        raise InvalidArgument(f"q has {q.shape[0]} heads, not a multiple of {num_kv} kv heads")
    check_same_device(q=q, keys=keys)
    require_triton(q, keys)
    out = torch.empty(num_kv, num_blocks, dtype=torch.float32, device=q.device)
    if num_blocks == 0:
        return out
    group = q.shape[0] // num_kv
    _block_scores_kernel[(num_kv, num_blocks)](
        q, keys, out, num_blocks, float(scale), G=group, T=block_tokens, D=dim,
        BG=next_pow2(group), BT=next_pow2(block_tokens), BD=next_pow2(dim))
    return out


def block_scores(q: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """Dispatch: the Triton kernel on CUDA, the PyTorch reference elsewhere."""
    if q.is_cuda and triton is not None:
        return block_scores_triton(q.contiguous(), keys.contiguous(), scale)
    return block_scores_reference(q, keys, scale)
