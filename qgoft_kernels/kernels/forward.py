"""Fused forward: all stages plus the scale in one launch over the activations.

A row of ``2**L`` (padded) columns is split into ``K`` chunks of ``2**LC`` columns, so that
a program's registers do not grow with ``d`` (docs/math.md §4). For ``x @ R`` each program
owns one chunk of ``BLOCK_N`` rows: it first runs the coarse stages (``r > LC``) on the
rows' ``K`` chunk roots, a small tile, to get its own root, then its chunk's fine stages.
For ``x @ R^T`` each program walks the chunks of its rows in turn (fine stages first),
keeps their roots, and finishes them with the coarse stages.
"""
import torch
import triton
import triton.language as tl

from .launch import acc_dtype, forward_config, new_output, round_bf16
from .stages import _column, _nt_sweep, _t_sweep, _to_output


@triton.jit
def _givens_fwd_kernel(x, y, coefs, scale, offsets, n_rows, d, stride_x, stride_y,
                       L: tl.constexpr, LC: tl.constexpr, BLOCK_N: tl.constexpr, QUASI: tl.constexpr,
                       HAS_SCALE: tl.constexpr, TRANSPOSE: tl.constexpr, ACC: tl.constexpr,
                       ROUND_BF16: tl.constexpr):
    CHUNK: tl.constexpr = 1 << LC
    K: tl.constexpr = 1 << (L - LC)
    o_n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    m_n = o_n < n_rows
    o_l = tl.arange(0, CHUNK)
    o_r = tl.arange(0, K) * CHUNK
    if TRANSPOSE:
        b_r = tl.zeros((BLOCK_N, K), ACC)
        for i_c in range(K):
            o_c = i_c * CHUNK + o_l
            m_c = o_c < d
            m_x = m_n[:, None] & m_c[None, :]
            b_x = tl.load(x + o_n[:, None] * stride_x + o_c[None, :], mask=m_x, other=0.0).to(ACC)
            if HAS_SCALE:
                b_x = b_x * tl.load(scale + o_c, mask=m_c, other=0.0).to(ACC)[None, :]
            b_y = _t_sweep(b_x, coefs, offsets, i_c, BLOCK_N, CHUNK, LC, 0, QUASI, ACC)
            # with several chunks, column 0 (the chunk's root) is final only after the coarse stages
            m_y = m_x & ((o_l > 0) | (K == 1))[None, :]
            tl.store(y + o_n[:, None] * stride_y + o_c[None, :], _to_output(b_y, y.dtype.element_ty, ROUND_BF16),
                     mask=m_y)
            b_r = tl.where(tl.arange(0, K)[None, :] == i_c, _column(b_y, 0, CHUNK), b_r)
        if L > LC:
            b_r = _t_sweep(b_r, coefs, offsets, 0, BLOCK_N, K, L - LC, LC, QUASI, ACC)
            tl.store(y + o_n[:, None] * stride_y + o_r[None, :], _to_output(b_r, y.dtype.element_ty, ROUND_BF16),
                     mask=m_n[:, None] & (o_r < d)[None, :])
    else:
        i_c = tl.program_id(1)
        o_c = i_c * CHUNK + o_l
        m_c = o_c < d
        m_x = m_n[:, None] & m_c[None, :]
        b_x = tl.load(x + o_n[:, None] * stride_x + o_c[None, :], mask=m_x, other=0.0).to(ACC)
        b_root = b_x
        if L > LC:
            b_r = tl.load(x + o_n[:, None] * stride_x + o_r[None, :], mask=m_n[:, None] & (o_r < d)[None, :],
                          other=0.0).to(ACC)
            b_r, _, _ = _nt_sweep(b_r, b_r, coefs, offsets, 0, BLOCK_N, K, L - LC, LC, False, QUASI, ACC)
            b_root = _column(b_r, i_c, K)
        b_y, _, _ = _nt_sweep(b_x, b_root, coefs, offsets, i_c, BLOCK_N, CHUNK, LC, 0, L > LC, QUASI, ACC)
        if HAS_SCALE:
            b_y = b_y * tl.load(scale + o_c, mask=m_c, other=0.0).to(ACC)[None, :]
        tl.store(y + o_n[:, None] * stride_y + o_c[None, :], _to_output(b_y, y.dtype.element_ty, ROUND_BF16),
                 mask=m_x)


def givens_fwd(x: torch.Tensor, coefs: torch.Tensor, scale: torch.Tensor | None,
               offsets: torch.Tensor, *, quasi: bool, transpose: bool) -> torch.Tensor:
    """``x @ R`` (``transpose=False``) or ``x @ R^T`` for a 2-D ``x`` with unit column stride.

    ``coefs`` (contiguous) holds the blocks ``[P, 2, 2]`` when ``quasi``, else the
    ``(cos, sin)`` of each angle ``[P, 2]``; ``offsets`` are the schedule's per-stage
    parameter offsets. Returns a new contiguous tensor of ``x``'s dtype.
    """
    n_rows, d = x.shape
    y = new_output((n_rows, d), x.dtype, x.device)
    if n_rows == 0:
        return y
    L = offsets.numel() - 1
    cfg = forward_config(1 << L, n_rows, x.device)
    LC = cfg.chunk.bit_length() - 1
    # x @ R: one program per (row block, chunk); x @ R^T: each program walks its chunks
    grid = (triton.cdiv(n_rows, cfg.block_n), 1 if transpose else 1 << (L - LC))
    _givens_fwd_kernel[grid](
        x, y, coefs, scale if scale is not None else coefs, offsets, n_rows, d, x.stride(0), y.stride(0),
        L=L, LC=LC, BLOCK_N=cfg.block_n, QUASI=quasi, HAS_SCALE=scale is not None, TRANSPOSE=transpose,
        ACC=acc_dtype(x.dtype), ROUND_BF16=round_bf16(x), num_warps=cfg.num_warps,
    )
    return y
