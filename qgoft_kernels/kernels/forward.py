"""Fused forward: all stages plus the scale in one pass over the activations.

A row of ``2**L`` (padded) columns is split into ``K`` chunks of ``2**LC`` columns; each
program owns one chunk of ``BLOCK_N`` rows. ``x @ R`` is one launch: a program first runs
the coarse stages (``r > LC``) on the row's ``K`` chunk roots, a small tile, to get its own
root, then its chunk's fine stages. ``x @ R^T`` runs the fine stages first; with ``K > 1``
a second, small launch finishes the roots (``_givens_fwd_roots_kernel``).
"""
import torch
import triton
import triton.language as tl

from .launch import acc_dtype, forward_config, new_output, round_bf16, tile_config
from .stages import _column, _nt_sweep, _t_sweep, _to_output


@triton.jit
def _givens_fwd_kernel(x, y, roots, coefs, scale, offsets, n_rows, d, stride_x, stride_y,
                       L: tl.constexpr, LC: tl.constexpr, BLOCK_N: tl.constexpr, QUASI: tl.constexpr,
                       HAS_SCALE: tl.constexpr, TRANSPOSE: tl.constexpr, ACC: tl.constexpr,
                       ROUND_BF16: tl.constexpr):
    CHUNK: tl.constexpr = 1 << LC
    K: tl.constexpr = 1 << (L - LC)
    i_n, i_c = tl.program_id(0), tl.program_id(1)
    o_n = (i_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    m_n = o_n < n_rows
    o_c = i_c * CHUNK + tl.arange(0, CHUNK)
    m_c = o_c < d
    m_x = m_n[:, None] & m_c[None, :]
    b_x = tl.load(x + o_n[:, None] * stride_x + o_c[None, :], mask=m_x, other=0.0).to(ACC)
    if HAS_SCALE:
        b_s = tl.load(scale + o_c, mask=m_c, other=0.0).to(ACC)[None, :]
    if TRANSPOSE:
        if HAS_SCALE:
            b_x = b_x * b_s
        b_y = _t_sweep(b_x, coefs, offsets, i_c, BLOCK_N, CHUNK, LC, 0, QUASI, ACC)
        if L > LC:
            # the chunk's root goes on through the coarse stages in the roots kernel
            tl.store(roots + o_n[:, None] * K + i_c, _column(b_y, 0, CHUNK), mask=m_n[:, None])
    else:
        b_root = b_x
        if L > LC:
            o_r = tl.arange(0, K) * CHUNK
            b_r = tl.load(x + o_n[:, None] * stride_x + o_r[None, :], mask=m_n[:, None] & (o_r < d)[None, :],
                          other=0.0).to(ACC)
            b_r, _, _ = _nt_sweep(b_r, b_r, coefs, offsets, 0, BLOCK_N, K, L - LC, LC, False, QUASI, ACC)
            b_root = _column(b_r, i_c, K)
        b_y, _, _ = _nt_sweep(b_x, b_root, coefs, offsets, i_c, BLOCK_N, CHUNK, LC, 0, L > LC, QUASI, ACC)
        if HAS_SCALE:
            b_y = b_y * b_s
    tl.store(y + o_n[:, None] * stride_y + o_c[None, :], _to_output(b_y, y.dtype.element_ty, ROUND_BF16), mask=m_x)


@triton.jit
def _givens_fwd_roots_kernel(roots, y, coefs, offsets, n_rows, d, stride_y, L: tl.constexpr,
                             LC: tl.constexpr, BLOCK_N: tl.constexpr, QUASI: tl.constexpr,
                             ACC: tl.constexpr, ROUND_BF16: tl.constexpr):
    """The coarse stages of ``x @ R^T`` on the chunk roots (every ``2**LC``-th column)."""
    K: tl.constexpr = 1 << (L - LC)
    o_n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    m_n = o_n < n_rows
    o_k = tl.arange(0, K)
    b_r = tl.load(roots + o_n[:, None] * K + o_k[None, :], mask=m_n[:, None], other=0.0)
    b_r = _t_sweep(b_r, coefs, offsets, 0, BLOCK_N, K, L - LC, LC, QUASI, ACC)
    o_r = o_k << LC
    tl.store(y + o_n[:, None] * stride_y + o_r[None, :], _to_output(b_r, y.dtype.element_ty, ROUND_BF16),
             mask=m_n[:, None] & (o_r < d)[None, :])


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
    K = 1 << (L - LC)
    acc = acc_dtype(x.dtype)
    roots = new_output((n_rows, K), torch.float64 if x.dtype == torch.float64 else torch.float32, x.device) \
        if transpose and K > 1 else y
    common = dict(QUASI=quasi, ACC=acc, ROUND_BF16=round_bf16(x))
    _givens_fwd_kernel[(triton.cdiv(n_rows, cfg.block_n), K)](
        x, y, roots, coefs, scale if scale is not None else coefs, offsets, n_rows, d, x.stride(0), y.stride(0),
        L=L, LC=LC, BLOCK_N=cfg.block_n, HAS_SCALE=scale is not None, TRANSPOSE=transpose,
        num_warps=cfg.num_warps, **common,
    )
    if transpose and K > 1:
        rcfg = tile_config(K, n_rows, x.device)
        _givens_fwd_roots_kernel[(triton.cdiv(n_rows, rcfg.block_n),)](
            roots, y, coefs, offsets, n_rows, d, y.stride(0), L=L, LC=LC, BLOCK_N=rcfg.block_n,
            num_warps=rcfg.num_warps, **common,
        )
    return y
