"""Building blocks shared by the forward and backward kernels.

A row is processed in *compact* form: the tree's stage ``r`` only touches the indices that
are multiples of ``s = 2**(r-1)``, and its pairs are the neighbours ``(2k, 2k+1)`` of that
subsequence. Splitting a tile into its even and odd halves therefore hands every stage
exactly its operands, and stage ``r`` costs ``W >> r`` pair updates on a tile of width ``W``.

Tiles are *chunks*: ``W`` aligned columns ``[i_chunk * W, (i_chunk + 1) * W)`` running the
stages ``R0 + 1 .. R0 + LT`` (``W = 2**LT``). A row of ``2**L`` columns is one chunk with
``R0 = 0``; a long row is ``K`` chunks of width ``C`` for the fine stages ``1 .. log2 C``,
plus one *root* tile of width ``K`` (every ``C``-th column) for the coarse stages, which
only ever touch those columns. docs/math.md derives all of it.
"""
import triton
import triton.language as tl


@triton.jit
def _load_blocks(coefs, offsets, r: tl.constexpr, i_chunk, N: tl.constexpr, QUASI: tl.constexpr,
                 ACC: tl.constexpr):
    """Stage ``r``'s 2x2 blocks for slots ``[i_chunk * N, i_chunk * N + N)``, as four ``[1, N]`` rows.

    ``coefs`` holds the blocks ``[P, 2, 2]`` (quasi) or ``(cos, sin)`` pairs ``[P, 2]``
    (givens). Slots past the stage's pair count get the identity block.
    """
    o_k = i_chunk * N + tl.arange(0, N)
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
def _column(b, i, W: tl.constexpr):
    """Column ``i`` (a runtime index) of a ``[BLOCK_N, W]`` tile, as ``[BLOCK_N, 1]``."""
    return tl.sum(tl.where(tl.arange(0, W)[None, :] == i, b, 0.0), axis=1)[:, None]


@triton.jit
def _nt_sweep(b_x, b_root, coefs, offsets, i_chunk, BLOCK_N: tl.constexpr, W: tl.constexpr,
              LT: tl.constexpr, R0: tl.constexpr, HAS_ROOT: tl.constexpr, QUASI: tl.constexpr,
              ACC: tl.constexpr):
    """``x @ P_{R0+LT} @ ... @ P_{R0+1}`` on a chunk, coarse stage first.

    With ``HAS_ROOT`` the chunk's first column is replaced by ``b_root`` (its value after the
    coarser stages, which act outside the chunk). Returns the result and, per stage
    (tuple index ``t - 1`` for stage ``R0 + t``), the two operands of its pairs: ``lo`` (the
    running value at the even slots) and ``hi`` (``x[:, s::2s]``, untouched until then).
    The backward needs them; the forward lets the compiler drop them.
    """
    his = ()
    for t in tl.static_range(1, LT + 1):
        b_x, b_hi = _deinterleave(b_x, BLOCK_N, W >> (t - 1))
        his = his + (b_hi,)
    if HAS_ROOT:
        b_x = b_root
    los = ()
    for t in tl.static_range(LT, 0, -1):
        b_00, b_01, b_10, b_11 = _load_blocks(coefs, offsets, R0 + t, i_chunk, W >> t, QUASI, ACC)
        b_hi = his[t - 1]
        los = (b_x,) + los
        b_x = _interleave(b_00 * b_x + b_10 * b_hi, b_01 * b_x + b_11 * b_hi, BLOCK_N, W >> (t - 1))
    return b_x, los, his


@triton.jit
def _t_stage(b_x, coefs, offsets, r: tl.constexpr, i_chunk, BLOCK_N: tl.constexpr, N: tl.constexpr,
             QUASI: tl.constexpr, ACC: tl.constexpr):
    """One stage of :func:`_t_sweep` on the ``N`` values of ``b_x`` still in play.

    Returns the pairs' even/odd operands, the even outputs (next stage's input) and the odd
    outputs, which are final: no later stage touches them.
    """
    b_00, b_01, b_10, b_11 = _load_blocks(coefs, offsets, r, i_chunk, N // 2, QUASI, ACC)
    b_lo, b_hi = _deinterleave(b_x, BLOCK_N, N)
    return b_lo, b_hi, b_00 * b_lo + b_01 * b_hi, b_10 * b_lo + b_11 * b_hi


@triton.jit
def _merge_levels(b_x, outs, BLOCK_N: tl.constexpr, W: tl.constexpr, LT: tl.constexpr):
    """Reassemble a chunk from its last even value and each stage's odd outputs."""
    for t in tl.static_range(LT, 0, -1):
        b_x = _interleave(b_x, outs[t - 1], BLOCK_N, W >> (t - 1))
    return b_x


@triton.jit
def _t_sweep(b_x, coefs, offsets, i_chunk, BLOCK_N: tl.constexpr, W: tl.constexpr, LT: tl.constexpr,
             R0: tl.constexpr, QUASI: tl.constexpr, ACC: tl.constexpr):
    """``x @ P_{R0+1}^T @ ... @ P_{R0+LT}^T`` on a chunk, fine stage first.

    Column 0 of the result is the chunk's root: final only if no coarser stage follows.
    """
    outs = ()
    for t in tl.static_range(1, LT + 1):
        _, _, b_x, b_out = _t_stage(b_x, coefs, offsets, R0 + t, i_chunk, BLOCK_N, W >> (t - 1), QUASI, ACC)
        outs = outs + (b_out,)
    return _merge_levels(b_x, outs, BLOCK_N, W, LT)
