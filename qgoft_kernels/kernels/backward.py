"""Fused backward: input gradient and parameter gradients from the saved input alone.

Both directions reduce to the same pair of sweeps (docs/math.md §3): a ``b`` tile swept
top-down with plain blocks and an ``a`` tile swept bottom-up with transposed blocks. At
each stage the pair operands of the two sweeps line up, and the block gradient is
``dB[i][j] = sum over rows of b_i * a_j`` with ``(b_0, b_1)`` and ``(a_0, a_1)`` the operands
each sweep fed that pair.

- ``y = x @ R``:   ``a = dy * scale``, ``b = x``;  ``dx = sweep_a``, ``dscale = sum(sweep_b * dy)``.
- ``y = x @ R^T``: ``a = x * scale``,  ``b = dy``; ``dx = sweep_b * scale``, ``dscale = sum(x * sweep_b)``.

``_givens_bwd_kernel`` runs both sweeps on a chunk: vector stages in registers, group
stages by lane exchanges on both sides. With more than one chunk per row,
``_givens_tops_kernel`` first runs the ``b`` side's coarse stages on the chunk roots (what
enters each chunk, and the coarse pairs' ``b`` operands), and after the chunk launch
``_givens_bwd_roots_kernel`` runs the ``a`` side's coarse stages from the carries the chunk
launch left in a small buffer. Each program walks a strided set of row blocks, sums its
share of the gradients in registers and writes one partial row; ``_givens_grad_sum_kernel``
adds each column up over the rows that wrote it, in a fixed order, so the result is
bit-identical from run to run (no atomics).
"""
import torch
import triton
import triton.language as tl

from .forward import givens_fwd
from .launch import SUM_ROWS, SUM_VALUES, acc_dtype, config, fit_grid, fit_roots, new_output, roots_config, round_bf16
from .tree import (
    _chunk,
    _count,
    _down_blocks,
    _down_from,
    _exchange_from,
    _first,
    _group_blocks,
    _groups_down,
    _groups_up,
    _load_raw,
    _offset,
    _owned_pair,
    _pair_scale,
    _rows,
    _store_tile,
    _tile,
    _to_output,
    _vector_down,
    _vector_merge,
    _vector_up,
)


@triton.jit
def _acc_rows(acc, b, a):
    """``acc`` plus ``b * a`` summed over the rows (axis 0): one multiply-add per row, the rows
    being each thread's register repetitions."""
    if b.shape[0] == 2:
        if len(b.shape) == 3:
            b0, b1 = tl.split(tl.permute(b, (1, 2, 0)))
            a0, a1 = tl.split(tl.permute(a, (1, 2, 0)))
        else:
            b0, b1 = tl.split(tl.permute(b, (1, 0)))
            a0, a1 = tl.split(tl.permute(a, (1, 0)))
        return acc + b0 * a0 + b1 * a1
    else:
        return acc + tl.sum(b * a, axis=0)


@triton.jit
def _acc_pair(acc, b_b0, b_b1, b_a0, b_a1, QUASI: tl.constexpr):
    """``acc`` plus one pair's gradient summed over the rows: ``dB = [[b0 a0, b0 a1], [b1 a0,
    b1 a1]]`` (quasi); for givens the two sums ``b1 a0 - b0 a1`` and ``b0 a0 + b1 a1`` in the first
    two entries (the angle's gradient is ``cos`` times the first less ``sin`` times the second,
    formed once, when stored: :func:`_store_grad`)."""
    if QUASI:
        return (_acc_rows(acc[0], b_b0, b_a0), _acc_rows(acc[1], b_b0, b_a1), _acc_rows(acc[2], b_b1, b_a0),
                _acc_rows(acc[3], b_b1, b_a1))
    else:
        return (_acc_rows(_acc_rows(acc[0], b_b1, b_a0), -b_b0, b_a1), _acc_rows(_acc_rows(acc[1], b_b0, b_a0),
                                                                                   b_b1, b_a1), acc[2], acc[3])


@triton.jit
def _store_grad(p_part, o_slot, m_slot, acc, c_cos, c_sin, D: tl.constexpr, QUASI: tl.constexpr):
    """Write a partial gradient at padded slots ``o_slot``: entry ``e`` of a block goes to
    ``p_part[e * D + o_slot]`` (quasi: four entries; givens: one angle, from the sums of
    :func:`_acc_pair` and the pairs' ``(cos, sin)``)."""
    if QUASI:
        tl.store(p_part + o_slot, acc[0], mask=m_slot)
        tl.store(p_part + D + o_slot, acc[1], mask=m_slot)
        tl.store(p_part + 2 * D + o_slot, acc[2], mask=m_slot)
        tl.store(p_part + 3 * D + o_slot, acc[3], mask=m_slot)
    else:
        tl.store(p_part + o_slot, c_cos * acc[0] - c_sin * acc[1], mask=m_slot)


@triton.jit
def _slot_start(r: tl.constexpr, L: tl.constexpr):
    """First padded slot of stage ``r``: stage ``r`` has ``2**(L - r)`` slots, stage 1 first."""
    return (1 << L) - (1 << (L - r + 1))


@triton.jit
def _bwd_loads(x, dy, tops, o_n, m_n, i_c, stride_x, stride_dy, o_c, m_c, G: tl.constexpr, K: tl.constexpr,
               MASKED: tl.constexpr):
    """What one row block reads, as loaded: the ``x`` and ``dy`` tiles ``[BLOCK_N, G * E]`` and,
    with ``K > 1`` chunks, the value entering the chunk's first column (``tops``, from
    :func:`_givens_tops_kernel`), in group 0 of a ``[BLOCK_N, G]`` (masked by ``m_n`` and ``m_c``
    where ``MASKED``)."""
    t_x = _load_raw(x, o_n, stride_x, o_c, m_n, m_c, MASKED)
    t_dy = _load_raw(dy, o_n, stride_dy, o_c, m_n, m_c, MASKED)
    if K == 1:
        t_top = ()
    else:
        # only group 0 needs it: the other groups' copies are masked off
        first = (tl.arange(0, G) == 0)[None, :]
        p_top = tops + o_n[:, None] * K + i_c + 0 * tl.arange(0, G)[None, :]
        if MASKED:
            t_top = tl.load(p_top, mask=m_n[:, None] & first, other=0.0)
        else:
            t_top = tl.load(p_top, mask=first, other=0.0)
    return t_x, t_dy, t_top


@triton.jit
def _bwd_block(dx, roots, o_n, m_n, i_c, stride_dx, t_x, t_dy, t_top, b_s, pair_scale, o_g, o_c, m_c,
               vector_cs, downs, group_cs, own_cos, own_sin, vector_acc, group_acc, b_ds,
               L: tl.constexpr, LE: tl.constexpr, LG: tl.constexpr, BLOCK_N: tl.constexpr, QUASI: tl.constexpr,
               HAS_SCALE: tl.constexpr, TRANSPOSE: tl.constexpr, HAS_DX: tl.constexpr, HAS_DPARAMS: tl.constexpr,
               HAS_DSCALE: tl.constexpr, ACC: tl.constexpr, ROUND_BF16: tl.constexpr, MASKED: tl.constexpr):
    """One row block of :func:`_givens_bwd_kernel` from its loads (:func:`_bwd_loads`); returns
    the updated gradient sums. ``MASKED`` rows and columns may run past the tensor."""
    E: tl.constexpr = 1 << LE
    G: tl.constexpr = 1 << LG
    K: tl.constexpr = 1 << (L - LE - LG)
    b_x = _tile(t_x, BLOCK_N, G, E, ACC)
    b_dy = _tile(t_dy, BLOCK_N, G, E, ACC)
    if TRANSPOSE:
        b_b = b_dy
        b_a = b_x
    else:
        b_b = b_x
        b_a = b_dy
    # the b side top-down: the chunk's first column enters as the stages above the chunk left it
    # (t_top), the group stages exchange the groups' first columns; each group owns the pair
    # whose right operand is its own first input and whose left operand its partner sent it
    b_first = _first(b_b, BLOCK_N, G, E, LE)
    if K > 1:
        b_top = tl.where(tl.arange(0, G)[None, :] == 0, t_top.to(ACC), b_first)
    else:
        b_top = b_first
    b_w, b_wo = _groups_down(b_top, downs, BLOCK_N, G, LG)
    b_z, los, his, _ = _vector_down(b_b, b_w, vector_cs, BLOCK_N, G, E, LE)
    # the a side bottom-up, meeting the b side's operands stage by stage
    if HAS_SCALE and LE > 0:
        # the scale multiplies the a side's columns as stage 1 splits them
        b_c, outs, v0s, v1s = _vector_up(b_a, vector_cs, BLOCK_N, G, E, LE, pair_scale)
    else:
        if HAS_SCALE:
            b_a = b_a * b_s
        b_c, outs, v0s, v1s = _vector_up(b_a, vector_cs, BLOCK_N, G, E, LE)
    b_root, b_al, b_ar = _groups_up(b_c, group_cs, BLOCK_N, G, LG)
    b_c = b_root
    if HAS_DPARAMS:
        new_acc = ()
        for t in tl.static_range(1, LE + 1):
            new_acc = new_acc + (_acc_pair(vector_acc[t - 1], los[t - 1], his[t - 1], v0s[t - 1], v1s[t - 1],
                                           QUASI),)
        vector_acc = new_acc
        group_acc = _acc_pair(group_acc, b_wo, b_first, b_al, b_ar, QUASI)
    if K > 1:
        # the chunk root's a carry goes on through the coarse stages in the roots kernel
        if MASKED:
            tl.store(roots + o_n[:, None] * K + i_c + 0 * o_g[None, :], b_c,
                     mask=m_n[:, None] & (tl.arange(0, G) == 0)[None, :])
        else:
            tl.store(roots + o_n[:, None] * K + i_c + 0 * o_g[None, :], b_c, mask=(tl.arange(0, G) == 0)[None, :])
    if HAS_DX:
        if TRANSPOSE:
            b_dx = b_z
            if HAS_SCALE:
                b_dx = b_z * b_s
        else:
            # with several chunks the chunk root is final only after the roots kernel
            b_dx = _vector_merge(b_root, outs, BLOCK_N, G, E, LE)
        _store_tile(dx, o_n, stride_dx, o_c, m_n, m_c, _to_output(b_dx, dx.dtype.element_ty, ROUND_BF16), BLOCK_N,
                    G, E, MASKED)
    if HAS_DSCALE:
        if TRANSPOSE:
            b_ds = _acc_rows(b_ds, b_x, b_z)
        else:
            b_ds = _acc_rows(b_ds, b_z, b_dy)
    return vector_acc, group_acc, b_ds


# the row loops' trip counts stay runtime values: one binary for every row count
@triton.jit(do_not_specialize=["n_full", "n_iters"])
def _givens_bwd_kernel(x, dy, dx, roots, tops, coefs, scale, partials, n_rows, d, stride_x, stride_dy, stride_dx,
                       n_full, n_iters, stride_part, ds_start,
                       L: tl.constexpr, LE: tl.constexpr, LG: tl.constexpr, BLOCK_N: tl.constexpr,
                       QUASI: tl.constexpr, HAS_SCALE: tl.constexpr, TRANSPOSE: tl.constexpr, HAS_DX: tl.constexpr,
                       HAS_DPARAMS: tl.constexpr, HAS_DSCALE: tl.constexpr, ACC: tl.constexpr,
                       ROUND_BF16: tl.constexpr, STAGES: tl.constexpr, FULL: tl.constexpr):
    """Gradients for chunk ``program_id(1)`` over the row blocks of program ``program_id(0)``.

    Tile ``[BLOCK_N, G, E]`` of ``x`` and of ``dy``, plus the ``b`` side's inputs at the ``K``
    chunk roots ``[BLOCK_N, K]``. The program walks row blocks ``program_id(0) + it *
    num_programs(0)``: the first ``n_full`` are whole, each one's loads issued during the block
    before it, so that no wait in a block is for a load issued in it; the rest (up to
    ``n_iters``) are masked. ``FULL``: ``d == 2**L``, no column masks. Its gradient sums
    (``[G, E/2]``, ``[G, E/4]``, ... per vector stage, ``[G]`` for the group-stage pair each
    group owns, ``[G, E]`` for the scale) go to row ``program_id(0)`` of ``partials``: the
    block gradients by entry and padded slot (see :func:`_store_grad`), the scale's from
    column ``ds_start``.
    """
    E: tl.constexpr = 1 << LE
    G: tl.constexpr = 1 << LG
    K: tl.constexpr = 1 << (L - LE - LG)
    i_g, i_c = tl.program_id(0), tl.program_id(1)
    n_groups = tl.num_programs(0)
    o_g, o_c, m_c, b_s, vector_cs = _chunk(coefs, scale, d, i_c, LE, LG, HAS_SCALE, QUASI, ACC)
    pair_scale = _pair_scale(scale, d, o_g, E, ACC) if HAS_SCALE and LE > 0 else None
    blocks = _group_blocks(coefs, d, o_g, LG, LE, QUASI, ACC)
    downs = _down_from(blocks, o_g, LG)
    group_cs = _exchange_from(blocks, o_g, LG)
    o_own, own_cos, own_sin = _owned_pair(blocks, o_g, L, LG, LE, ACC)
    vector_acc = ()
    for t in tl.static_range(1, LE + 1):
        z = tl.zeros((G, E >> t), ACC)
        vector_acc = vector_acc + ((z, z, z, z),)
    z = tl.zeros((G,), ACC)
    group_acc = (z, z, z, z)
    b_ds = tl.zeros((G, E), ACC)
    # the whole blocks: the compiler's software pipelining issues each block's loads STAGES - 1
    # blocks ahead, as asynchronous copies into shared memory; no row masks
    for it in tl.range(0, n_full, num_stages=STAGES):
        o_n, m_n = _rows(i_g + it * n_groups, n_rows, BLOCK_N, False)
        t_x, t_dy, t_top = _bwd_loads(x, dy, tops, o_n, m_n, i_c, stride_x, stride_dy, o_c, m_c, G, K, not FULL)
        vector_acc, group_acc, b_ds = _bwd_block(
            dx, roots, o_n, m_n, i_c, stride_dx, t_x, t_dy, t_top, b_s, pair_scale, o_g, o_c, m_c, vector_cs,
            downs, group_cs, own_cos, own_sin, vector_acc, group_acc, b_ds, L, LE, LG, BLOCK_N, QUASI,
            HAS_SCALE, TRANSPOSE, HAS_DX, HAS_DPARAMS, HAS_DSCALE, ACC, ROUND_BF16, not FULL)
    for it in range(n_full, n_iters):
        o_n, m_n = _rows(i_g + it * n_groups, n_rows, BLOCK_N, True)
        t_x, t_dy, t_top = _bwd_loads(x, dy, tops, o_n, m_n, i_c, stride_x, stride_dy, o_c, m_c, G, K, True)
        vector_acc, group_acc, b_ds = _bwd_block(
            dx, roots, o_n, m_n, i_c, stride_dx, t_x, t_dy, t_top, b_s, pair_scale, o_g, o_c, m_c, vector_cs,
            downs, group_cs, own_cos, own_sin, vector_acc, group_acc, b_ds, L, LE, LG, BLOCK_N, QUASI,
            HAS_SCALE, TRANSPOSE, HAS_DX, HAS_DPARAMS, HAS_DSCALE, ACC, ROUND_BF16, True)

    p_part = partials + i_g.to(tl.int64) * stride_part
    if HAS_DPARAMS:
        # every padded slot of the chunk is written (pairs past d hold zeros): no masks
        for t in tl.static_range(1, LE + 1):
            o_k = o_g[:, None] * (E >> t) + tl.arange(0, E >> t)[None, :]
            c00, _, c10, _ = vector_cs[t - 1]
            _store_grad(p_part, _slot_start(t, L) + o_k, o_k >= 0, vector_acc[t - 1], tl.reshape(c00, (G, E >> t)),
                        tl.reshape(c10, (G, E >> t)), 1 << L, QUASI)
        _store_grad(p_part, o_own, o_own >= 0, group_acc, tl.reshape(own_cos, (G,)), tl.reshape(own_sin, (G,)),
                    1 << L, QUASI)
    if HAS_DSCALE:
        tl.store(p_part + ds_start + o_c, tl.reshape(b_ds, (G * E,)))


# the row loops' trip counts stay runtime values: one binary for every row count
@triton.jit(do_not_specialize=["n_iters"])
def _givens_tops_kernel(x, dy, tops, coefs, n_rows, d, stride_x, stride_dy, n_iters,
                        L: tl.constexpr, R0: tl.constexpr, BLOCK_N: tl.constexpr, QUASI: tl.constexpr,
                        TRANSPOSE: tl.constexpr, ACC: tl.constexpr):
    """The ``b`` side's top-down chunk stages ``L .. R0 + 1`` on the chunk roots: tile ``[BLOCK_N, K]``
    of ``x`` (or ``dy`` for ``x @ R^T``) at every ``2**R0``-th column. Writes ``tops``
    ``[3, rows, K]``: the value entering each chunk's first column (the chunk launch reads it),
    then the operands of the chunk-stage pair each chunk root owns, its partner's value and its
    own input (the roots launch reads them)."""
    K: tl.constexpr = 1 << (L - R0)
    i_g = tl.program_id(0)
    n_groups = tl.num_programs(0)
    o_k = tl.arange(0, K)
    downs = _down_blocks(coefs, d, o_k, L - R0, R0, QUASI, ACC)
    for it in range(n_iters):
        o_n = ((i_g + it * n_groups) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        m_n = o_n < n_rows
        if TRANSPOSE:
            p_b = dy + o_n[:, None] * stride_dy
        else:
            p_b = x + o_n[:, None] * stride_x
        b_h = tl.load(p_b + (o_k << R0)[None, :], mask=m_n[:, None] & ((o_k << R0) < d)[None, :],
                      other=0.0).to(ACC)
        b_top, b_wo = _groups_down(b_h, downs, BLOCK_N, K, L - R0)
        p_t = tops + o_n[:, None] * K + o_k[None, :]
        tl.store(p_t, b_top, mask=m_n[:, None])
        tl.store(p_t + n_rows * K, b_wo, mask=m_n[:, None])
        tl.store(p_t + 2 * n_rows * K, b_h, mask=m_n[:, None])


# the row loops' trip counts stay runtime values: one binary for every row count
@triton.jit(do_not_specialize=["n_iters"])
def _givens_bwd_roots_kernel(dx, roots, tops, coefs, partials, n_rows, d, stride_dx,
                             n_iters, n_chunks, stride_part,
                             L: tl.constexpr, R0: tl.constexpr, BLOCK_N: tl.constexpr, QUASI: tl.constexpr,
                             TRANSPOSE: tl.constexpr, HAS_DX: tl.constexpr, HAS_DPARAMS: tl.constexpr,
                             ACC: tl.constexpr, ROUND_BF16: tl.constexpr):
    """The coarse stages ``R0 + 1 .. L`` on the chunk roots: tile ``[BLOCK_N, K]``.

    The ``a`` side comes from the roots buffer, the ``b`` side's operands from ``tops``
    (:func:`_givens_tops_kernel`); writes these stages' partial gradients and, for ``y = x @ R``,
    ``dx[:, ::2**R0]``.
    """
    K: tl.constexpr = 1 << (L - R0)
    i_g = tl.program_id(0)
    n_groups = tl.num_programs(0)
    o_k = tl.arange(0, K)
    blocks = _group_blocks(coefs, d, o_k, L - R0, R0, QUASI, ACC)
    group_cs = _exchange_from(blocks, o_k, L - R0)
    o_own, own_cos, own_sin = _owned_pair(blocks, o_k, L, L - R0, R0, ACC)
    z = tl.zeros((K,), ACC)
    group_acc = (z, z, z, z)
    for it in range(n_iters):
        o_n = ((i_g + it * n_groups) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        m_n = o_n < n_rows
        # chunks past d were not launched: their carries are zeros (identity pairs ignore them)
        b_c = tl.load(roots + o_n[:, None] * K + o_k[None, :], mask=m_n[:, None] & (o_k < n_chunks)[None, :],
                      other=0.0)
        p_t = tops + o_n[:, None] * K + o_k[None, :]
        b_wo = tl.load(p_t + n_rows * K, mask=m_n[:, None], other=0.0)
        b_h = tl.load(p_t + 2 * n_rows * K, mask=m_n[:, None], other=0.0)
        b_out, b_al, b_ar = _groups_up(b_c, group_cs, BLOCK_N, K, L - R0)
        if HAS_DPARAMS:
            group_acc = _acc_pair(group_acc, b_wo, b_h, b_al, b_ar, QUASI)
        if HAS_DX:
            if not TRANSPOSE:
                tl.store(dx + o_n[:, None] * stride_dx + (o_k << R0)[None, :],
                         _to_output(b_out, dx.dtype.element_ty, ROUND_BF16),
                         mask=m_n[:, None] & ((o_k << R0) < d)[None, :])
    if HAS_DPARAMS:
        _store_grad(partials + i_g.to(tl.int64) * stride_part, o_own, o_own >= 0, group_acc,
                    tl.reshape(own_cos, (K,)), tl.reshape(own_sin, (K,)), 1 << L, QUASI)


@triton.jit
def _givens_grad_sum_kernel(partials, dparams, dscale, n_main, n_coarse, d, stride_part, ds_start,
                            L: tl.constexpr, R0: tl.constexpr, QUASI: tl.constexpr, HAS_DPARAMS: tl.constexpr,
                            HAS_DSCALE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK: tl.constexpr):
    """Sum ``BLOCK`` columns of the partials over the rows that wrote them (tiles of ``BLOCK_P x
    BLOCK``, in a fixed order) and write them where they belong: ``dparams`` ``[P, 2, 2]`` or
    ``[P]`` from the padded slots, ``dscale`` ``[d]``. The chunk launch's ``n_main`` programs
    wrote the slots of stages up to ``R0`` and the scale's; the roots launch's ``n_coarse``
    programs those of the stages above ``R0``."""
    D: tl.constexpr = 1 << L
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    width = ds_start + (D if HAS_DSCALE else 0)
    m = o < width
    coarse = (o < ds_start) & (o % D >= D - (1 << (L - R0)))
    n_wrote = tl.where(coarse, n_coarse, n_main)
    b_sum = tl.zeros((BLOCK,), partials.dtype.element_ty)
    # only as many row tiles as this block's columns were written in
    for i in range(0, tl.max(tl.where(m, n_wrote, 0)), BLOCK_P):
        o_i = i + tl.arange(0, BLOCK_P)
        b_sum += tl.sum(tl.load(partials + o_i[:, None].to(tl.int64) * stride_part + o[None, :],
                                mask=(o_i[:, None] < n_wrote[None, :]) & m[None, :], other=0.0), axis=0)
    if HAS_DPARAMS:
        # column e * D + slot; slot in stage r is start(r) + k, parameter offset(r) + k
        o_e = o // D
        o_s = o % D
        o_p = o * 0 - 1
        for r in tl.static_range(1, L + 1):
            o_k = o_s - ((1 << L) - (1 << (L - r + 1)))
            inside = (o_k >= 0) & (o_k < (1 << (L - r))) & (o_k < _count(d, r))
            o_p = tl.where(inside, _offset(d, r) + o_k, o_p)
        m_p = m & (o < ds_start) & (o_p >= 0)
        tl.store(dparams + (o_p * 4 + o_e if QUASI else o_p), b_sum, mask=m_p)
    if HAS_DSCALE:
        o_c = o - ds_start
        tl.store(dscale + o_c, b_sum, mask=m & (o_c >= 0) & (o_c < d))


def givens_bwd(x: torch.Tensor, dy: torch.Tensor, coefs: torch.Tensor, scale: torch.Tensor | None, *,
               quasi: bool, transpose: bool, need_dx: bool, need_dparams: bool, need_dscale: bool):
    """Gradients of :func:`givens_fwd` with respect to ``x``, the parameters and ``scale``.

    ``x`` and ``dy`` are 2-D with unit column stride; ``coefs`` as for :func:`givens_fwd`.
    Returns ``(dx, dparams, dscale)``, each
    ``None`` where not asked for: ``dparams`` is ``dB`` ``[P, 2, 2]`` (quasi) or ``dtheta``
    ``[P]`` (givens), and ``dparams``/``dscale`` are float32 (float64 for float64 ``x``).
    """
    if not (need_dparams or need_dscale):
        # the input gradient alone is the rotation in the other direction
        dx = givens_fwd(dy, coefs, scale, quasi=quasi, transpose=not transpose) if need_dx else None
        return dx, None, None
    n_rows, d = x.shape
    n_params = coefs.shape[0]
    per_pair = 4 if quasi else 1
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    L = (d - 1).bit_length()
    D = 1 << L
    dx = new_output((n_rows, d), x.dtype, x.device) if need_dx else None
    dparams = new_output((n_params, 2, 2) if quasi else (n_params,), acc, x.device) if need_dparams else None
    dscale = new_output((d,), acc, x.device) if need_dscale else None
    ds_start = per_pair * D if need_dparams else 0
    width = ds_start + (D if need_dscale else 0)
    cfg = config("bwd", D, n_rows, x.element_size(), x.device, n_chunks=lambda k: -(-d * k // D))
    n_chunks = triton.cdiv(d, cfg.chunk)
    K = D // cfg.chunk
    flags = dict(QUASI=quasi, TRANSPOSE=transpose, HAS_DX=need_dx, HAS_DPARAMS=need_dparams,
                 ACC=acc_dtype(x.dtype), ROUND_BF16=round_bf16(x))
    # no roots or tops buffers with one chunk: any tensor of their dtype stands in (never touched)
    roots = new_output((n_rows, K), acc, x.device) if K > 1 else x.new_empty(0, dtype=acc)
    tops = new_output((3, n_rows, K), acc, x.device) if K > 1 else roots
    tensors = dict(x=x, dy=dy, dx=dx if need_dx else x, roots=roots, coefs=coefs, partials=roots)
    sizes = dict(n_rows=n_rows, d=d, stride_x=x.stride(0), stride_dy=dy.stride(0),
                 stride_dx=dx.stride(0) if need_dx else 0, stride_part=width)
    args = dict(**tensors, **sizes, tops=tops, scale=scale if scale is not None else coefs, ds_start=ds_start, L=L,
                LE=cfg.le, LG=cfg.lg, BLOCK_N=cfg.block_n, HAS_SCALE=scale is not None, HAS_DSCALE=need_dscale,
                STAGES=cfg.stages, FULL=d == D, **flags)
    cfg = fit_grid(cfg, _givens_bwd_kernel, args, n_rows, n_chunks, x.device)
    # the tops and roots launches: programs of their own (as many as fill the GPU); the roots
    # launch's each write a partial row too
    R0 = cfg.le + cfg.lg
    tops_args = dict(x=x, dy=dy, tops=tops, coefs=coefs, n_rows=n_rows, d=d, stride_x=x.stride(0),
                     stride_dy=dy.stride(0), L=L, R0=R0, QUASI=quasi, TRANSPOSE=transpose, ACC=flags["ACC"])
    roots_args = dict(dx=tensors["dx"], roots=roots, tops=tops, coefs=coefs, partials=roots, n_rows=n_rows, d=d,
                      stride_dx=sizes["stride_dx"], n_chunks=n_chunks, stride_part=width, L=L, R0=R0, **flags)
    if K > 1:
        rcfg = roots_config(n_rows, K, x.device)
        tops_cfg = fit_roots(rcfg, _givens_tops_kernel, tops_args, n_rows, x.device)
        roots_cfg = fit_roots(rcfg, _givens_bwd_roots_kernel, roots_args, n_rows, x.device)
    else:
        roots_cfg = (1, 0, 0, 1)
    roots_programs = roots_cfg[1]
    # one partial row per program: block gradients by entry and padded slot, then the scale's
    n_parts = max(cfg.programs, roots_programs)
    partials = new_output((n_parts, width), acc, x.device)
    tensors["partials"] = args["partials"] = roots_args["partials"] = partials
    if K > 1:
        # the b side's chunk stages first: what enters each chunk
        _givens_tops_kernel[(tops_cfg[1],)](**tops_args, BLOCK_N=tops_cfg[0], n_iters=tops_cfg[2],
                                            num_warps=tops_cfg[3])
    # with no rows the programs still run once, to write their (zero) partial rows
    _givens_bwd_kernel[(cfg.programs, n_chunks)](**args, n_full=cfg.n_full, n_iters=cfg.n_iters,
                                                 num_warps=cfg.num_warps)
    if K > 1:
        _givens_bwd_roots_kernel[(roots_programs,)](**roots_args, BLOCK_N=roots_cfg[0], n_iters=roots_cfg[2],
                                                    num_warps=roots_cfg[3])
    # the partial rows of a column block in tiles of up to SUM_ROWS rows, SUM_VALUES per thread:
    # a tile's loads go out at once (with more per thread, the compiler reuses registers and
    # waits between batches of them)
    block_p = min(SUM_ROWS, triton.next_power_of_2(cfg.programs))
    block = max(16, 128 * SUM_VALUES // block_p)
    _givens_grad_sum_kernel[(triton.cdiv(width, block),)](
        partials=partials, dparams=dparams if need_dparams else partials,
        dscale=dscale if need_dscale else partials, n_main=cfg.programs,
        n_coarse=roots_programs, d=d, stride_part=width, ds_start=ds_start, L=L, R0=R0, QUASI=quasi,
        HAS_DPARAMS=need_dparams, HAS_DSCALE=need_dscale, BLOCK_P=block_p, BLOCK=block, num_warps=4)
    return dx, dparams, dscale
