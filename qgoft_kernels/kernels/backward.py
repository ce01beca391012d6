"""Fused backward: input gradient and parameter gradients from the saved input alone.

Both directions reduce to the same pair of sweeps (docs/math.md §3): an ``a`` tile swept
with transposed blocks (fine stage first) and a ``b`` tile swept with plain blocks (coarse
stage first). At each stage the slots of the two sweeps line up, and the block gradient is
``dB[i][j] = sum over rows of b_i * a_j`` with ``(b_0, b_1)`` and ``(a_0, a_1)`` the operands
each sweep fed that stage.

- ``y = x @ R``:   ``a = dy * scale``, ``b = x``;  ``dx = sweep_a``, ``dscale = sum(sweep_b * dy)``.
- ``y = x @ R^T``: ``a = x * scale``,  ``b = dy``; ``dx = sweep_b * scale``, ``dscale = sum(x * sweep_b)``.

``_givens_bwd_kernel`` runs this on chunks (the fine stages); with more than one chunk per
row, ``_givens_bwd_roots_kernel`` then runs it on the chunk roots (the coarse stages),
from the ``a`` roots the first launch left in a small buffer. Each program walks a strided
group of row blocks and keeps its share of the parameter gradients in registers, then
writes one partial row; the launcher sums the partials in a fixed order, so the result is
bit-identical from run to run (no atomics).
"""
import torch
import triton
import triton.language as tl

from .forward import givens_fwd
from .launch import acc_dtype, backward_config, backward_groups, new_output, round_bf16, tile_config
from .stages import _column, _load_blocks, _merge_levels, _nt_sweep, _t_stage, _to_output


@triton.jit
def _zero_accumulators(W: tl.constexpr, LT: tl.constexpr, QUASI: tl.constexpr, ACC: tl.constexpr):
    """Per stage of a chunk: four block-gradient sums (quasi) or one angle gradient (givens)."""
    b_dps = ()
    for t in tl.static_range(1, LT + 1):
        if QUASI:
            b_dps = b_dps + ((tl.zeros((W >> t,), ACC), tl.zeros((W >> t,), ACC),
                              tl.zeros((W >> t,), ACC), tl.zeros((W >> t,), ACC)),)
        else:
            b_dps = b_dps + (tl.zeros((W >> t,), ACC),)
    return b_dps


@triton.jit
def _bwd_tile(b_a, b_b, b_root, b_dps, coefs, offsets, i_chunk, BLOCK_N: tl.constexpr, W: tl.constexpr,
              LT: tl.constexpr, R0: tl.constexpr, HAS_ROOT: tl.constexpr, HAS_DPARAMS: tl.constexpr,
              QUASI: tl.constexpr, ACC: tl.constexpr):
    """Both sweeps over one chunk, adding each stage's ``sum b_i a_j`` to ``b_dps``.

    Returns the transposed sweep of ``a``, the plain sweep of ``b`` and the accumulators.
    """
    # the plain sweep of b, keeping each stage's operands ...
    b_bout, b_blos, b_bhis = _nt_sweep(b_b, b_root, coefs, offsets, i_chunk, BLOCK_N, W, LT, R0, HAS_ROOT,
                                       QUASI, ACC)
    # ... then the transposed sweep of a, meeting them stage by stage
    b_aouts = ()
    b_new = ()
    for t in tl.static_range(1, LT + 1):
        b_a0, b_a1, b_a, b_aout = _t_stage(b_a, coefs, offsets, R0 + t, i_chunk, BLOCK_N, W >> (t - 1), QUASI, ACC)
        b_aouts = b_aouts + (b_aout,)
        if HAS_DPARAMS:
            b_b0 = b_blos[t - 1]
            b_b1 = b_bhis[t - 1]
            if QUASI:
                b_acc = b_dps[t - 1]
                b_new = b_new + ((b_acc[0] + tl.sum(b_b0 * b_a0, axis=0),
                                  b_acc[1] + tl.sum(b_b0 * b_a1, axis=0),
                                  b_acc[2] + tl.sum(b_b1 * b_a0, axis=0),
                                  b_acc[3] + tl.sum(b_b1 * b_a1, axis=0)),)
            else:
                # dtheta = sum(dB * dB/dtheta) with dB/dtheta = [[-sin, -cos], [cos, -sin]]
                b_cos, _, b_sin, _ = _load_blocks(coefs, offsets, R0 + t, i_chunk, W >> t, QUASI, ACC)
                b_g = b_cos * (b_b1 * b_a0 - b_b0 * b_a1) - b_sin * (b_b0 * b_a0 + b_b1 * b_a1)
                b_new = b_new + (b_dps[t - 1] + tl.sum(b_g, axis=0),)
    if HAS_DPARAMS:
        b_dps = b_new
    return _merge_levels(b_a, b_aouts, BLOCK_N, W, LT), b_bout, b_dps


@triton.jit
def _store_partials(dparams, b_dps, i_g, n_params, offsets, i_chunk, W: tl.constexpr, LT: tl.constexpr,
                    R0: tl.constexpr, QUASI: tl.constexpr):
    """Write one group's parameter gradients for the slots of chunk ``i_chunk``."""
    for t in tl.static_range(1, LT + 1):
        o_k = i_chunk * (W >> t) + tl.arange(0, W >> t)
        i_off = tl.load(offsets + (R0 + t - 1))
        m_k = o_k < tl.load(offsets + R0 + t) - i_off
        if QUASI:
            p_dp = dparams + (i_g.to(tl.int64) * n_params + i_off + o_k) * 4
            b_acc = b_dps[t - 1]
            tl.store(p_dp, b_acc[0], mask=m_k)
            tl.store(p_dp + 1, b_acc[1], mask=m_k)
            tl.store(p_dp + 2, b_acc[2], mask=m_k)
            tl.store(p_dp + 3, b_acc[3], mask=m_k)
        else:
            tl.store(dparams + i_g.to(tl.int64) * n_params + i_off + o_k, b_dps[t - 1], mask=m_k)


@triton.jit
def _givens_bwd_kernel(x, dy, dx, roots, coefs, scale, offsets, dparams, dscale, n_rows, d,
                       stride_x, stride_dy, stride_dx, n_params,
                       L: tl.constexpr, LC: tl.constexpr, BLOCK_N: tl.constexpr, QUASI: tl.constexpr,
                       HAS_SCALE: tl.constexpr, TRANSPOSE: tl.constexpr, HAS_DX: tl.constexpr,
                       HAS_DPARAMS: tl.constexpr, HAS_DSCALE: tl.constexpr, ACC: tl.constexpr,
                       ROUND_BF16: tl.constexpr):
    CHUNK: tl.constexpr = 1 << LC
    K: tl.constexpr = 1 << (L - LC)
    i_g, i_c = tl.program_id(0), tl.program_id(1)
    n_groups = tl.num_programs(0)
    o_c = i_c * CHUNK + tl.arange(0, CHUNK)
    m_c = o_c < d
    if HAS_SCALE:
        b_s = tl.load(scale + o_c, mask=m_c, other=0.0).to(ACC)[None, :]
    b_dps = _zero_accumulators(CHUNK, LC, QUASI, ACC)
    b_ds = tl.zeros((CHUNK,), ACC)

    for i_b in range(i_g, tl.cdiv(n_rows, BLOCK_N), n_groups):
        o_n = (i_b * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        m_n = o_n < n_rows
        m_x = m_n[:, None] & m_c[None, :]
        b_x = tl.load(x + o_n[:, None] * stride_x + o_c[None, :], mask=m_x, other=0.0).to(ACC)
        b_dy = tl.load(dy + o_n[:, None] * stride_dy + o_c[None, :], mask=m_x, other=0.0).to(ACC)
        if TRANSPOSE:
            b_a = b_x
            if HAS_SCALE:
                b_a = b_x * b_s
            b_b = b_dy
        else:
            b_a = b_dy
            if HAS_SCALE:
                b_a = b_dy * b_s
            b_b = b_x
        b_root = b_b
        if L > LC:
            # b's value at this chunk's root after the coarse stages, from the row's K roots
            o_r = tl.arange(0, K) * CHUNK
            m_r = m_n[:, None] & (o_r < d)[None, :]
            if TRANSPOSE:
                b_r = tl.load(dy + o_n[:, None] * stride_dy + o_r[None, :], mask=m_r, other=0.0).to(ACC)
            else:
                b_r = tl.load(x + o_n[:, None] * stride_x + o_r[None, :], mask=m_r, other=0.0).to(ACC)
            b_r, _, _ = _nt_sweep(b_r, b_r, coefs, offsets, 0, BLOCK_N, K, L - LC, LC, False, QUASI, ACC)
            b_root = _column(b_r, i_c, K)
        b_aout, b_bout, b_dps = _bwd_tile(b_a, b_b, b_root, b_dps, coefs, offsets, i_c, BLOCK_N, CHUNK, LC, 0,
                                          L > LC, HAS_DPARAMS, QUASI, ACC)
        if L > LC:
            # a's root goes on through the coarse stages in the roots kernel
            tl.store(roots + o_n[:, None] * K + i_c, _column(b_aout, 0, CHUNK), mask=m_n[:, None])
        if HAS_DX:
            if TRANSPOSE:
                b_dx = b_bout
                if HAS_SCALE:
                    b_dx = b_bout * b_s
            else:
                # column 0 is final only with one chunk; else the roots kernel overwrites it
                b_dx = b_aout
            tl.store(dx + o_n[:, None] * stride_dx + o_c[None, :], _to_output(b_dx, dx.dtype.element_ty, ROUND_BF16),
                     mask=m_x)
        if HAS_DSCALE:
            if TRANSPOSE:
                b_ds += tl.sum(b_x * b_bout, axis=0)
            else:
                b_ds += tl.sum(b_bout * b_dy, axis=0)

    if HAS_DSCALE:
        tl.store(dscale + i_g.to(tl.int64) * d + o_c, b_ds, mask=m_c)
    if HAS_DPARAMS:
        _store_partials(dparams, b_dps, i_g, n_params, offsets, i_c, CHUNK, LC, 0, QUASI)


@triton.jit
def _givens_bwd_roots_kernel(x, dy, dx, roots, coefs, offsets, dparams, n_rows, d,
                             stride_x, stride_dy, stride_dx, n_params,
                             L: tl.constexpr, LC: tl.constexpr, BLOCK_N: tl.constexpr, QUASI: tl.constexpr,
                             TRANSPOSE: tl.constexpr, HAS_DX: tl.constexpr, HAS_DPARAMS: tl.constexpr,
                             ACC: tl.constexpr, ROUND_BF16: tl.constexpr):
    """The coarse stages on the chunk roots: their parameter gradients, and ``dx`` there."""
    K: tl.constexpr = 1 << (L - LC)
    i_g = tl.program_id(0)
    n_groups = tl.num_programs(0)
    o_k = tl.arange(0, K)
    o_r = o_k << LC
    b_dps = _zero_accumulators(K, L - LC, QUASI, ACC)
    for i_b in range(i_g, tl.cdiv(n_rows, BLOCK_N), n_groups):
        o_n = (i_b * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        m_n = o_n < n_rows
        m_r = m_n[:, None] & (o_r < d)[None, :]
        b_a = tl.load(roots + o_n[:, None] * K + o_k[None, :], mask=m_n[:, None], other=0.0)
        if TRANSPOSE:
            b_b = tl.load(dy + o_n[:, None] * stride_dy + o_r[None, :], mask=m_r, other=0.0).to(ACC)
        else:
            b_b = tl.load(x + o_n[:, None] * stride_x + o_r[None, :], mask=m_r, other=0.0).to(ACC)
        b_aout, _, b_dps = _bwd_tile(b_a, b_b, b_b, b_dps, coefs, offsets, 0, BLOCK_N, K, L - LC, LC, False,
                                     HAS_DPARAMS, QUASI, ACC)
        if HAS_DX:
            if not TRANSPOSE:
                tl.store(dx + o_n[:, None] * stride_dx + o_r[None, :],
                         _to_output(b_aout, dx.dtype.element_ty, ROUND_BF16), mask=m_r)
    if HAS_DPARAMS:
        _store_partials(dparams, b_dps, i_g, n_params, offsets, 0, K, L - LC, LC, QUASI)


def givens_bwd(x: torch.Tensor, dy: torch.Tensor, coefs: torch.Tensor, scale: torch.Tensor | None,
               offsets: torch.Tensor, *, quasi: bool, transpose: bool, need_dx: bool,
               need_dparams: bool, need_dscale: bool):
    """Gradients of :func:`givens_fwd` with respect to ``x``, the parameters and ``scale``.

    ``x`` and ``dy`` are 2-D with unit column stride. Returns ``(dx, dparams, dscale)``, each
    ``None`` where not asked for: ``dparams`` is ``dB`` ``[P, 2, 2]`` (quasi) or ``dtheta``
    ``[P]`` (givens), and ``dparams``/``dscale`` are float32 (float64 for float64 ``x``).
    """
    if not (need_dparams or need_dscale):
        # the input gradient alone is the rotation in the other direction
        dx = givens_fwd(dy, coefs, scale, offsets, quasi=quasi, transpose=not transpose) if need_dx else None
        return dx, None, None
    n_rows, d = x.shape
    L = offsets.numel() - 1
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    cfg = backward_config(1 << L, n_rows, x.device)
    LC = cfg.chunk.bit_length() - 1
    K = 1 << (L - LC)
    groups = backward_groups(triton.cdiv(n_rows, cfg.block_n), K, x.device)
    n_params = coefs.shape[0]

    def partials(shape):
        # one partial row per group, every element written by the kernels; then a
        # fixed-order sum: deterministic
        return new_output(shape, acc, x.device) if n_rows else torch.zeros(shape, dtype=acc, device=x.device)

    dx = new_output((n_rows, d), x.dtype, x.device) if need_dx else None
    dparams = partials((groups, n_params) + ((2, 2) if quasi else ())) if need_dparams else None
    dscale = partials((groups, d)) if need_dscale else None
    if n_rows > 0:
        roots = new_output((n_rows, K), acc, x.device) if K > 1 else x
        flags = dict(QUASI=quasi, TRANSPOSE=transpose, HAS_DX=need_dx, HAS_DPARAMS=need_dparams,
                     ACC=acc_dtype(x.dtype), ROUND_BF16=round_bf16(x))
        args = (x, dy, dx if need_dx else x, roots)
        strides = (x.stride(0), dy.stride(0), dx.stride(0) if need_dx else 0, n_params)
        _givens_bwd_kernel[(groups, K)](
            *args, coefs, scale if scale is not None else coefs, offsets,
            dparams if need_dparams else x, dscale if need_dscale else x, n_rows, d, *strides,
            L=L, LC=LC, BLOCK_N=cfg.block_n, HAS_SCALE=scale is not None, HAS_DSCALE=need_dscale,
            num_warps=cfg.num_warps, **flags,
        )
        if K > 1:
            rcfg = tile_config(K, n_rows, x.device, tile=2048)
            _givens_bwd_roots_kernel[(groups,)](
                *args, coefs, offsets, dparams if need_dparams else x, n_rows, d, *strides,
                L=L, LC=LC, BLOCK_N=rcfg.block_n, num_warps=rcfg.num_warps, **flags,
            )
    return dx, dparams.sum(0) if need_dparams else None, dscale.sum(0) if need_dscale else None
