"""Fused forward: all stages plus the scale in one pass over the activations.

``x @ R`` (top-down) is one launch: every thread rebuilds its vector's root from the row's
inputs along the root's ancestors (``_chain``), then runs its vector's stages, so no value
crosses threads. ``x @ R^T`` (bottom-up) runs the vector stages, then the group stages by
exchanging roots across lanes; with more than one chunk per row the chunk roots go to a
small fp32 buffer ``[rows, K]`` and ``_givens_fwd_roots_kernel`` finishes the coarse stages
on them and writes ``y[:, ::chunk]``.
"""
import torch
import triton
import triton.language as tl

from .launch import acc_dtype, config, new_output, roots_config, round_bf16
from .tree import (
    _chain,
    _chain_blocks,
    _chunk,
    _exchange_blocks,
    _groups_up,
    _load_tile,
    _rows,
    _store_tile,
    _to_output,
    _vector_down,
    _vector_merge,
    _vector_up,
)


@triton.jit
def _fwd_block(x, y, roots, i_b, i_c, n_rows, stride_x, stride_y, b_s, o_g, o_c, m_c, vector_cs, group_cs,
               chain_cs, L: tl.constexpr, LE: tl.constexpr, LG: tl.constexpr, BLOCK_N: tl.constexpr,
               HAS_SCALE: tl.constexpr, TRANSPOSE: tl.constexpr, ACC: tl.constexpr, ROUND_BF16: tl.constexpr,
               MASKED: tl.constexpr):
    """One row block of :func:`_givens_fwd_kernel` (``MASKED``: it may run past ``n_rows``)."""
    E: tl.constexpr = 1 << LE
    G: tl.constexpr = 1 << LG
    K: tl.constexpr = 1 << (L - LE - LG)
    o_n, m_n = _rows(i_b, n_rows, BLOCK_N, MASKED)
    b_x = _load_tile(x, o_n, stride_x, o_c, m_n, m_c, BLOCK_N, G, E, ACC)
    if TRANSPOSE:
        if HAS_SCALE:
            b_x = b_x * b_s
        b_c, outs, _, _ = _vector_up(b_x, vector_cs, BLOCK_N, G, E, LE)
        b_c, b_root, _, _ = _groups_up(b_c, group_cs, BLOCK_N, G, LG)
        if K > 1:
            # the chunk's root is final only after the coarse stages: the roots kernel
            # finishes it and overwrites y there
            tl.store(roots + o_n[:, None] * K + i_c + 0 * o_g[None, :], b_c,
                     mask=m_n[:, None] & (tl.arange(0, G) == 0)[None, :])
        b_y = _vector_merge(b_root, outs, BLOCK_N, G, E, LE)
    else:
        b_w, _, _ = _chain(x + o_n[:, None] * stride_x, m_n[:, None], chain_cs, L - LE, ACC)
        b_y, _, _ = _vector_down(b_x, b_w, vector_cs, BLOCK_N, G, E, LE)
        if HAS_SCALE:
            b_y = b_y * b_s
    _store_tile(y, o_n, stride_y, o_c, m_n, m_c, _to_output(b_y, y.dtype.element_ty, ROUND_BF16), BLOCK_N, G, E)


@triton.jit
def _givens_fwd_kernel(x, y, roots, coefs, scale, n_rows, d, stride_x, stride_y, n_full, n_iters,
                       L: tl.constexpr, LE: tl.constexpr, LG: tl.constexpr, BLOCK_N: tl.constexpr,
                       QUASI: tl.constexpr, HAS_SCALE: tl.constexpr, TRANSPOSE: tl.constexpr,
                       ACC: tl.constexpr, ROUND_BF16: tl.constexpr, STAGES: tl.constexpr):
    """``y = x @ R`` or ``x @ R^T`` on chunk ``program_id(1)`` of the rows of program ``program_id(0)``.

    Tile ``[BLOCK_N, G, E]`` (``G = 2**LG`` vectors of ``E = 2**LE`` columns); the program
    loads its coefficients once (``[G, E/2]``, ``[G, E/4]``, ... per vector stage, ``[G]`` per
    group or chain stage) and walks row blocks ``program_id(0) + it * num_programs(0)``: the
    first ``n_full`` whole, the rest (up to ``n_iters``) masked.
    """
    E: tl.constexpr = 1 << LE
    i_g, i_c = tl.program_id(0), tl.program_id(1)
    n_groups = tl.num_programs(0)
    o_g, o_c, m_c, b_s, vector_cs = _chunk(coefs, scale, d, i_c, LE, LG, HAS_SCALE, QUASI, ACC)
    group_cs = _exchange_blocks(coefs, d, o_g, LG, LE, QUASI, ACC) if TRANSPOSE else None
    chain_cs = None if TRANSPOSE else _chain_blocks(coefs, d, o_g * E, L, LE, 0, QUASI, ACC)
    for it in tl.range(0, n_full, num_stages=STAGES):
        _fwd_block(x, y, roots, i_g + it * n_groups, i_c, n_rows, stride_x, stride_y, b_s, o_g, o_c, m_c,
                   vector_cs, group_cs, chain_cs, L, LE, LG, BLOCK_N, HAS_SCALE, TRANSPOSE, ACC, ROUND_BF16, False)
    for it in range(n_full, n_iters):
        _fwd_block(x, y, roots, i_g + it * n_groups, i_c, n_rows, stride_x, stride_y, b_s, o_g, o_c, m_c,
                   vector_cs, group_cs, chain_cs, L, LE, LG, BLOCK_N, HAS_SCALE, TRANSPOSE, ACC, ROUND_BF16, True)


@triton.jit
def _givens_fwd_roots_kernel(y, roots, coefs, n_rows, d, stride_y, n_iters, n_chunks,
                             L: tl.constexpr, R0: tl.constexpr, BLOCK_N: tl.constexpr, QUASI: tl.constexpr,
                             ACC: tl.constexpr, ROUND_BF16: tl.constexpr):
    """The coarse stages ``R0 + 1 .. L`` of ``x @ R^T`` on the chunk roots: tile ``[BLOCK_N, K]``.

    Reads the roots buffer the chunk launch left and writes the final ``y[:, ::2**R0]``.
    """
    K: tl.constexpr = 1 << (L - R0)
    i_g = tl.program_id(0)
    n_groups = tl.num_programs(0)
    o_k = tl.arange(0, K)
    group_cs = _exchange_blocks(coefs, d, o_k, L - R0, R0, QUASI, ACC)
    for it in range(n_iters):
        o_n = ((i_g + it * n_groups) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        m_n = o_n < n_rows
        # chunks past d were not launched: their roots are zeros, which the identity blocks
        # of the missing pairs leave alone
        b_c = tl.load(roots + o_n[:, None] * K + o_k[None, :], mask=m_n[:, None] & (o_k < n_chunks)[None, :],
                      other=0.0)
        _, b_out, _, _ = _groups_up(b_c, group_cs, BLOCK_N, K, L - R0)
        tl.store(y + o_n[:, None] * stride_y + (o_k << R0)[None, :],
                 _to_output(b_out, y.dtype.element_ty, ROUND_BF16), mask=m_n[:, None] & ((o_k << R0) < d)[None, :])


def givens_fwd(x: torch.Tensor, coefs: torch.Tensor, scale: torch.Tensor | None, *, quasi: bool,
               transpose: bool) -> torch.Tensor:
    """``x @ R`` (``transpose=False``) or ``x @ R^T`` for a 2-D ``x`` with unit column stride.

    ``coefs`` (contiguous) holds the blocks ``[P, 2, 2]`` when ``quasi``, else the
    ``(cos, sin)`` of each angle ``[P, 2]``. Returns a new contiguous tensor of ``x``'s dtype.
    """
    n_rows, d = x.shape
    y = new_output((n_rows, d), x.dtype, x.device)
    if n_rows == 0:
        return y
    L = (d - 1).bit_length()
    cfg = config("fwd", 1 << L, n_rows, x.element_size(), x.device, n_chunks=lambda k: -(-d * k // (1 << L)))
    chunk = cfg.chunk
    n_chunks = triton.cdiv(d, chunk)
    K = (1 << L) // chunk
    roots = new_output((n_rows, K), torch.float64 if x.dtype == torch.float64 else torch.float32, x.device) \
        if transpose and K > 1 else y
    acc, rounding = acc_dtype(x.dtype), round_bf16(x)
    _givens_fwd_kernel[(cfg.programs, n_chunks)](
        x=x, y=y, roots=roots, coefs=coefs, scale=scale if scale is not None else coefs, n_rows=n_rows, d=d,
        stride_x=x.stride(0), stride_y=y.stride(0), n_full=cfg.n_full, n_iters=cfg.n_iters, L=L, LE=cfg.le,
        LG=cfg.lg, BLOCK_N=cfg.block_n, QUASI=quasi, HAS_SCALE=scale is not None, TRANSPOSE=transpose, ACC=acc,
        ROUND_BF16=rounding, STAGES=cfg.stages, num_warps=cfg.num_warps)
    if transpose and K > 1:
        rcfg = roots_config(n_rows, K, x.device)
        _givens_fwd_roots_kernel[(rcfg[1],)](
            y=y, roots=roots, coefs=coefs, n_rows=n_rows, d=d, stride_y=y.stride(0), n_iters=rcfg[2],
            n_chunks=n_chunks, L=L, R0=cfg.le + cfg.lg, BLOCK_N=rcfg[0], QUASI=quasi, ACC=acc, ROUND_BF16=rounding,
            num_warps=rcfg[3])
    return y
