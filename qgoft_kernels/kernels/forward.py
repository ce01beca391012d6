"""Fused forward: all stages plus the scale in one pass over a block of rows."""
import torch
import triton
import triton.language as tl

from .launch import acc_dtype, forward_config, new_output, round_bf16
from .stages import _nt_sweep, _t_sweep, _to_output


@triton.jit
def _givens_fwd_kernel(x, y, coefs, scale, offsets, n_rows, d, stride_x, stride_y,
                       D_PAD: tl.constexpr, L: tl.constexpr, BLOCK_N: tl.constexpr,
                       QUASI: tl.constexpr, HAS_SCALE: tl.constexpr, TRANSPOSE: tl.constexpr,
                       ACC: tl.constexpr, ROUND_BF16: tl.constexpr):
    i_n = tl.program_id(0).to(tl.int64)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, D_PAD)
    m_d = o_d < d
    m_x = (o_n < n_rows)[:, None] & m_d[None, :]
    b_x = tl.load(x + o_n[:, None] * stride_x + o_d[None, :], mask=m_x, other=0.0).to(ACC)
    if HAS_SCALE:
        b_s = tl.load(scale + o_d, mask=m_d, other=0.0).to(ACC)[None, :]
    if TRANSPOSE:
        if HAS_SCALE:
            b_x = b_x * b_s
        b_y = _t_sweep(b_x, coefs, offsets, BLOCK_N, D_PAD, L, QUASI, ACC)
    else:
        b_y, _, _ = _nt_sweep(b_x, coefs, offsets, BLOCK_N, D_PAD, L, QUASI, ACC)
        if HAS_SCALE:
            b_y = b_y * b_s
    tl.store(y + o_n[:, None] * stride_y + o_d[None, :], _to_output(b_y, y.dtype.element_ty, ROUND_BF16), mask=m_x)


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
    _givens_fwd_kernel[(triton.cdiv(n_rows, cfg.block_n),)](
        x, y, coefs, scale if scale is not None else coefs, offsets, n_rows, d, x.stride(0), y.stride(0),
        D_PAD=1 << L, L=L, BLOCK_N=cfg.block_n, QUASI=quasi, HAS_SCALE=scale is not None,
        TRANSPOSE=transpose, ACC=acc_dtype(x.dtype), ROUND_BF16=round_bf16(x), num_warps=cfg.num_warps,
    )
    return y
