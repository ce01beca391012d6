"""Building blocks shared by the forward and backward kernels.

A row tile ``[BLOCK_N, D_PAD]`` is processed in *compact* form: the tree's stage ``r``
only touches the indices that are multiples of ``s = 2**(r-1)``, and its pairs are the
neighbours ``(2k, 2k+1)`` of that subsequence. Splitting a tile into its even and odd
halves ``L`` times therefore hands every stage exactly its operands, and stage ``r`` costs
``D_PAD >> r`` pair updates instead of ``D_PAD``. docs/math.md derives both sweeps.
"""
import triton
import triton.language as tl


@triton.jit
def _load_blocks(coefs, offsets, r: tl.constexpr, D_PAD: tl.constexpr, QUASI: tl.constexpr,
                 ACC: tl.constexpr):
    """The 2x2 blocks of stage ``r`` for its ``D_PAD >> r`` slots, as four ``[1, n]`` rows.

    ``coefs`` holds the blocks ``[P, 2, 2]`` (quasi) or ``(cos, sin)`` pairs ``[P, 2]``
    (givens). Slots past the stage's pair count get the identity block.
    """
    o_k = tl.arange(0, D_PAD >> r)
    i_off = tl.load(offsets + (r - 1))
    m_k = o_k < tl.load(offsets + r) - i_off
    if QUASI:
        p_b = coefs + (i_off + o_k) * 4
        b_00 = tl.load(p_b, mask=m_k, other=1.0).to(ACC)
        b_01 = tl.load(p_b + 1, mask=m_k, other=0.0).to(ACC)
        b_10 = tl.load(p_b + 2, mask=m_k, other=0.0).to(ACC)
        b_11 = tl.load(p_b + 3, mask=m_k, other=1.0).to(ACC)
    else:
        p_b = coefs + (i_off + o_k) * 2
        b_00 = tl.load(p_b, mask=m_k, other=1.0).to(ACC)
        b_10 = tl.load(p_b + 1, mask=m_k, other=0.0).to(ACC)
        b_01 = -b_10
        b_11 = b_00
    return b_00[None, :], b_01[None, :], b_10[None, :], b_11[None, :]


@triton.jit
def _to_output(b, DTYPE: tl.constexpr, ROUND_BF16: tl.constexpr):
    """Cast ``b`` for storing as ``DTYPE``.

    GPUs round fp32 -> bf16 to nearest even; the Triton interpreter truncates, doubling the
    error. ``ROUND_BF16`` (set only when interpreting) rounds explicitly so both agree.
    """
    if ROUND_BF16:
        bits = b.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        b = tl.where(b != b, b, bits.to(tl.float32, bitcast=True))
    return b.to(DTYPE)


@triton.jit
def _deinterleave(b, BLOCK_N: tl.constexpr, N: tl.constexpr):
    """``[BLOCK_N, N] -> (b[:, 0::2], b[:, 1::2])``."""
    return tl.split(tl.reshape(b, (BLOCK_N, N // 2, 2)))


@triton.jit
def _interleave(b_even, b_odd, BLOCK_N: tl.constexpr, N: tl.constexpr):
    """Inverse of :func:`_deinterleave`: ``N`` is the length of the result."""
    return tl.reshape(tl.join(b_even, b_odd), (BLOCK_N, N))


@triton.jit
def _nt_sweep(b_x, coefs, offsets, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, L: tl.constexpr,
              QUASI: tl.constexpr, ACC: tl.constexpr):
    """``x @ P_L @ ... @ P_1`` on a tile, coarse stage first.

    Returns the result and, per stage ``r`` (tuple index ``r - 1``), the two operands of its
    pairs: ``lo[r-1]`` (the running value at the even slots) and ``hi[r-1]``
    (``x[:, s::2s]``, untouched until stage ``r``). The backward needs them; the forward
    lets the compiler drop them.
    """
    his = ()
    for r in tl.static_range(1, L + 1):
        b_x, b_hi = _deinterleave(b_x, BLOCK_N, D_PAD >> (r - 1))
        his = his + (b_hi,)
    los = ()
    for r in tl.static_range(L, 0, -1):
        b_00, b_01, b_10, b_11 = _load_blocks(coefs, offsets, r, D_PAD, QUASI, ACC)
        b_hi = his[r - 1]
        los = (b_x,) + los
        b_x = _interleave(b_00 * b_x + b_10 * b_hi, b_01 * b_x + b_11 * b_hi, BLOCK_N, D_PAD >> (r - 1))
    return b_x, los, his


@triton.jit
def _t_stage(b_x, coefs, offsets, r: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr,
             QUASI: tl.constexpr, ACC: tl.constexpr):
    """Stage ``r`` of :func:`_t_sweep` on the ``D_PAD >> (r-1)`` values still in play.

    Returns the pairs' even/odd operands, the even outputs (next stage's input) and the odd
    outputs, which are final: no later stage touches them.
    """
    b_00, b_01, b_10, b_11 = _load_blocks(coefs, offsets, r, D_PAD, QUASI, ACC)
    b_lo, b_hi = _deinterleave(b_x, BLOCK_N, D_PAD >> (r - 1))
    return b_lo, b_hi, b_00 * b_lo + b_01 * b_hi, b_10 * b_lo + b_11 * b_hi


@triton.jit
def _merge_levels(b_x, outs, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, L: tl.constexpr):
    """Reassemble a full tile from the last even value and each stage's odd outputs."""
    for r in tl.static_range(L, 0, -1):
        b_x = _interleave(b_x, outs[r - 1], BLOCK_N, D_PAD >> (r - 1))
    return b_x


@triton.jit
def _t_sweep(b_x, coefs, offsets, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, L: tl.constexpr,
             QUASI: tl.constexpr, ACC: tl.constexpr):
    """``x @ P_1^T @ ... @ P_L^T`` on a tile, fine stage first."""
    outs = ()
    for r in tl.static_range(1, L + 1):
        _, _, b_x, b_out = _t_stage(b_x, coefs, offsets, r, BLOCK_N, D_PAD, QUASI, ACC)
        outs = outs + (b_out,)
    return _merge_levels(b_x, outs, BLOCK_N, D_PAD, L)
