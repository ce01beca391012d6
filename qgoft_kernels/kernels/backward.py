"""Fused backward: input gradient and parameter gradients from the saved input alone.

Both directions reduce to the same pair of sweeps (docs/math.md): an ``a`` tile swept with
transposed blocks (fine stage first) and a ``b`` tile swept with plain blocks (coarse stage
first). At stage ``r`` the slots of the two sweeps line up, and the block gradient is
``dB[i][j] = sum over rows of b_i * a_j`` with ``(b_0, b_1)`` and ``(a_0, a_1)`` the operands
each sweep fed that stage.

- ``y = x @ R``:   ``a = dy * scale``, ``b = x``;  ``dx = sweep_a``, ``dscale = sum(sweep_b * dy)``.
- ``y = x @ R^T``: ``a = x * scale``,  ``b = dy``; ``dx = sweep_b * scale``, ``dscale = sum(x * sweep_b)``.

Each program walks a strided set of row blocks and keeps its share of the parameter
gradients in registers, then writes one partial row; the launcher sums the partials in a
fixed order, so the result is bit-identical from run to run (no atomics).
"""
import torch
import triton
import triton.language as tl

from .forward import givens_fwd
from .launch import acc_dtype, backward_config, backward_programs, new_output, round_bf16
from .stages import _load_blocks, _merge_levels, _nt_sweep, _t_stage, _to_output


@triton.jit
def _givens_bwd_kernel(x, dy, dx, coefs, scale, offsets, dparams, dscale, n_rows, d,
                       stride_x, stride_dy, stride_dx, n_params,
                       D_PAD: tl.constexpr, L: tl.constexpr, BLOCK_N: tl.constexpr,
                       QUASI: tl.constexpr, HAS_SCALE: tl.constexpr, TRANSPOSE: tl.constexpr,
                       HAS_DX: tl.constexpr, HAS_DPARAMS: tl.constexpr, HAS_DSCALE: tl.constexpr,
                       ACC: tl.constexpr, ROUND_BF16: tl.constexpr):
    i_p = tl.program_id(0)
    n_programs = tl.num_programs(0)
    o_d = tl.arange(0, D_PAD)
    m_d = o_d < d
    if HAS_SCALE:
        b_s = tl.load(scale + o_d, mask=m_d, other=0.0).to(ACC)[None, :]

    # per stage: the four block-gradient sums (quasi) or the angle gradient (givens)
    b_dps = ()
    for r in tl.static_range(1, L + 1):
        if QUASI:
            b_dps = b_dps + ((tl.zeros((D_PAD >> r,), ACC), tl.zeros((D_PAD >> r,), ACC),
                              tl.zeros((D_PAD >> r,), ACC), tl.zeros((D_PAD >> r,), ACC)),)
        else:
            b_dps = b_dps + (tl.zeros((D_PAD >> r,), ACC),)
    b_ds = tl.zeros((D_PAD,), ACC)

    for i_b in range(i_p, tl.cdiv(n_rows, BLOCK_N), n_programs):
        o_n = (i_b * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        m_x = (o_n < n_rows)[:, None] & m_d[None, :]
        b_x = tl.load(x + o_n[:, None] * stride_x + o_d[None, :], mask=m_x, other=0.0).to(ACC)
        b_dy = tl.load(dy + o_n[:, None] * stride_dy + o_d[None, :], mask=m_x, other=0.0).to(ACC)
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
        # the plain sweep of b, keeping each stage's operands ...
        b_bout, b_blos, b_bhis = _nt_sweep(b_b, coefs, offsets, BLOCK_N, D_PAD, L, QUASI, ACC)
        # ... then the transposed sweep of a, meeting them stage by stage
        b_aouts = ()
        b_new = ()
        for r in tl.static_range(1, L + 1):
            b_a0, b_a1, b_a, b_aout = _t_stage(b_a, coefs, offsets, r, BLOCK_N, D_PAD, QUASI, ACC)
            b_aouts = b_aouts + (b_aout,)
            if HAS_DPARAMS:
                b_b0 = b_blos[r - 1]
                b_b1 = b_bhis[r - 1]
                if QUASI:
                    b_acc = b_dps[r - 1]
                    b_new = b_new + ((b_acc[0] + tl.sum(b_b0 * b_a0, axis=0),
                                      b_acc[1] + tl.sum(b_b0 * b_a1, axis=0),
                                      b_acc[2] + tl.sum(b_b1 * b_a0, axis=0),
                                      b_acc[3] + tl.sum(b_b1 * b_a1, axis=0)),)
                else:
                    # dtheta = sum(dB * dB/dtheta) with dB/dtheta = [[-sin, -cos], [cos, -sin]]
                    b_cos, _, b_sin, _ = _load_blocks(coefs, offsets, r, D_PAD, QUASI, ACC)
                    b_g = b_cos * (b_b1 * b_a0 - b_b0 * b_a1) - b_sin * (b_b0 * b_a0 + b_b1 * b_a1)
                    b_new = b_new + (b_dps[r - 1] + tl.sum(b_g, axis=0),)
        if HAS_DPARAMS:
            b_dps = b_new

        if HAS_DX:
            if TRANSPOSE:
                b_dx = b_bout
                if HAS_SCALE:
                    b_dx = b_bout * b_s
            else:
                b_dx = _merge_levels(b_a, b_aouts, BLOCK_N, D_PAD, L)
            tl.store(dx + o_n[:, None] * stride_dx + o_d[None, :], _to_output(b_dx, dx.dtype.element_ty, ROUND_BF16), mask=m_x)
        if HAS_DSCALE:
            if TRANSPOSE:
                b_ds += tl.sum(b_x * b_bout, axis=0)
            else:
                b_ds += tl.sum(b_bout * b_dy, axis=0)

    if HAS_DSCALE:
        tl.store(dscale + i_p.to(tl.int64) * d + o_d, b_ds, mask=m_d)
    if HAS_DPARAMS:
        for r in tl.static_range(1, L + 1):
            o_k = tl.arange(0, D_PAD >> r)
            i_off = tl.load(offsets + (r - 1))
            m_k = o_k < tl.load(offsets + r) - i_off
            if QUASI:
                p_dp = dparams + i_p.to(tl.int64) * n_params * 4 + (i_off + o_k) * 4
                b_acc = b_dps[r - 1]
                tl.store(p_dp, b_acc[0], mask=m_k)
                tl.store(p_dp + 1, b_acc[1], mask=m_k)
                tl.store(p_dp + 2, b_acc[2], mask=m_k)
                tl.store(p_dp + 3, b_acc[3], mask=m_k)
            else:
                tl.store(dparams + i_p.to(tl.int64) * n_params + i_off + o_k, b_dps[r - 1], mask=m_k)


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
    n_programs = backward_programs(triton.cdiv(n_rows, cfg.block_n), x.device)
    n_params = coefs.shape[0]
    dx = new_output((n_rows, d), x.dtype, x.device) if need_dx else None
    # one partial row per program (each writes all of its row), summed below in a fixed
    # order: deterministic
    def partials(shape):
        if n_rows == 0:
            return torch.zeros(shape, dtype=acc, device=x.device)
        return new_output(shape, acc, x.device)

    dparams = partials((n_programs, n_params) + ((2, 2) if quasi else ())) if need_dparams else None
    dscale = partials((n_programs, d)) if need_dscale else None
    if n_rows > 0:
        _givens_bwd_kernel[(n_programs,)](
            x, dy, dx if need_dx else x, coefs, scale if scale is not None else coefs, offsets,
            dparams if need_dparams else x, dscale if need_dscale else x, n_rows, d, x.stride(0), dy.stride(0), dx.stride(0) if need_dx else 0, n_params,
            D_PAD=1 << L, L=L, BLOCK_N=cfg.block_n, QUASI=quasi, HAS_SCALE=scale is not None,
            TRANSPOSE=transpose, HAS_DX=need_dx, HAS_DPARAMS=need_dparams, HAS_DSCALE=need_dscale,
            ACC=acc_dtype(x.dtype), ROUND_BF16=round_bf16(x), num_warps=cfg.num_warps,
        )
    return dx, dparams.sum(0) if need_dparams else None, dscale.sum(0) if need_dscale else None
