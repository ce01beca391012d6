"""Building blocks of the kernels: the tree's stages on a tile of thread vectors.

A program's tile is ``[BLOCK_N, G, E]``: ``BLOCK_N`` rows, ``G`` *groups* of ``E``
contiguous columns each (``E`` is one 16-byte vector of the input dtype). Triton gives each
thread whole vectors (its rows are register repetitions), so the tree splits in three:

- **vector stages** ``1 .. LE`` (``E = 2**LE``) pair columns inside one vector: register
  arithmetic on the compact even/odd split, no data movement between threads;
- **group stages** ``LE + 1 .. LE + LG`` pair the *roots* of groups (a group's first
  column). Bottom-up (``x @ R^T``) a group's root meets its partner's by exchanging one
  value across lanes (``_partner``: a butterfly shuffle inside a warp, shared memory across
  warps). Top-down (``x @ R``) needs no exchange: each thread rebuilds its root's value from
  the row's inputs along its ancestor chain (``_chain``), a few loads that hit the L1 cache;
- **chunk stages** above ``LE + LG`` pair the roots of whole chunks (``G * E`` columns).
  Top-down they are part of each thread's chain; bottom-up a second, small launch finishes
  them on the chunk roots, which are groups of a tile with ``E = 1``.

Offsets and pair counts come from the closed form, so no per-stage scalar is loaded; the
coefficients are loaded once per program and stay in registers while it walks its rows.
docs/math.md derives the schedule and the gradients.
"""
import triton
import triton.language as tl
from triton.language.standard import xor_sum


@triton.jit
def _count(d, r: tl.constexpr):
    """Pairs in stage ``r``: ``ceil((d - s) / 2s)`` with ``s = 2**(r-1)`` (0 when ``d <= s``)."""
    return (d + (1 << (r - 1)) - 1) >> r


@triton.jit
def _offset(d, r: tl.constexpr):
    """Index of stage ``r``'s first parameter."""
    off = d * 0
    for t in tl.static_range(1, r):
        off += _count(d, t)
    return off


@triton.jit
def _blocks(coefs, d, r: tl.constexpr, o_k, QUASI: tl.constexpr, ACC: tl.constexpr):
    """Stage ``r``'s blocks for slots ``o_k`` as four tiles ``(c00, c01, c10, c11)`` of ``o_k``'s shape.

    ``coefs`` holds the blocks ``[P, 2, 2]`` (quasi) or ``(cos, sin)`` pairs ``[P, 2]``
    (givens, whose block is ``[[cos, -sin], [sin, cos]]``). Slots past the stage's pair
    count get the identity.
    """
    m_k = o_k < _count(d, r)
    p = _offset(d, r) + o_k
    if QUASI:
        p_c = coefs + p * 4
        c00 = tl.load(p_c, mask=m_k, other=1.0).to(ACC)
        c01 = tl.load(p_c + 1, mask=m_k, other=0.0).to(ACC)
        c10 = tl.load(p_c + 2, mask=m_k, other=0.0).to(ACC)
        c11 = tl.load(p_c + 3, mask=m_k, other=1.0).to(ACC)
    else:
        p_c = coefs + p * 2
        c00 = tl.load(p_c, mask=m_k, other=1.0).to(ACC)
        c10 = tl.load(p_c + 1, mask=m_k, other=0.0).to(ACC)
        c01 = -c10
        c11 = c00
    return c00, c01, c10, c11


@triton.jit
def _vector_blocks(coefs, d, o_g, E: tl.constexpr, LE: tl.constexpr, QUASI: tl.constexpr, ACC: tl.constexpr):
    """Per vector stage ``t`` (tuple index ``t - 1``), the blocks of groups ``o_g``, each ``[1, G, E >> t]``."""
    out = ()
    for t in tl.static_range(1, LE + 1):
        o_k = o_g[:, None] * (E >> t) + tl.arange(0, E >> t)[None, :]
        c00, c01, c10, c11 = _blocks(coefs, d, t, o_k, QUASI, ACC)
        out = out + ((c00[None], c01[None], c10[None], c11[None]),)
    return out


@triton.jit
def _chain_blocks(coefs, d, o_pos, L: tl.constexpr, R0: tl.constexpr, R_OWN: tl.constexpr, QUASI: tl.constexpr,
                  ACC: tl.constexpr):
    """The top-down chain of roots at positions ``o_pos``, stages ``L`` down to ``R0 + 1``.

    Per stage (tuple index ``L - r``): ``(c_w, c_h, o_h, m_h, own)``, each ``[1, G]``. Stage
    ``r``'s pair ``(i, i + s)`` that holds the root turns the value ``w`` carried at ``i`` and
    the input ``h`` at ``o_h = i + s`` into the value at the root's side: ``c_w * w + c_h * h``.
    ``own`` marks, for stages up to ``R_OWN``, the roots that are that pair's right side
    (``o_pos == i + s``): such a root owns the pair's gradient.
    """
    out = ()
    for r in tl.static_range(L, R0, -1):
        c00, c01, c10, c11 = _blocks(coefs, d, r, o_pos >> r, QUASI, ACC)
        right = ((o_pos >> (r - 1)) & 1) == 1
        o_h = ((o_pos >> r) << r) + (1 << (r - 1))
        own = right & ((o_pos & ((1 << (r - 1)) - 1)) == 0) & (r <= R_OWN)
        out = out + ((tl.where(right, c01, c00)[None, :], tl.where(right, c11, c10)[None, :],
                      o_h[None, :], (o_h < d)[None, :], own[None, :]),)
    return out


@triton.jit
def _exchange_blocks(coefs, d, o_g, LG: tl.constexpr, R0: tl.constexpr, QUASI: tl.constexpr, ACC: tl.constexpr):
    """The bottom-up group stages ``R0 + 1 .. R0 + LG`` seen from group ``o_g`` (global index).

    Per stage (tuple index ``j``, stride ``2**j`` groups): ``(c_me, c_other, keep, last)``,
    each ``[1, G]``. With ``u`` this group's value and ``v`` its partner's (group
    ``o_g ^ 2**j``), the stage gives ``c_me * u + c_other * v``: the carry that goes on where
    ``keep`` (a left root), the final output where ``last`` (a right root, which owns the
    pair's gradient). Groups that are no root at this stage have neither flag.
    """
    out = ()
    for j in tl.static_range(LG):
        c00, c01, c10, c11 = _blocks(coefs, d, R0 + j + 1, o_g >> (j + 1), QUASI, ACC)
        right = ((o_g >> j) & 1) == 1
        root = (o_g & ((1 << j) - 1)) == 0
        out = out + ((tl.where(right, c11, c00)[None, :], tl.where(right, c10, c01)[None, :],
                      (root & ~right)[None, :], (root & right)[None, :]),)
    return out


@triton.jit
def _owned_pair(coefs, d, o_g, L: tl.constexpr, LG: tl.constexpr, R0: tl.constexpr, QUASI: tl.constexpr,
                ACC: tl.constexpr):
    """The pair of the group stages ``R0 + 1 .. R0 + LG`` that group ``o_g`` owns (it is its right root).

    Returns its padded slot (stage ``r`` has ``2**(L - r)`` slots, stage 1 first; ``-1`` where
    the group owns none, as group 0 does) and its ``(cos, sin)`` for angle gradients.
    """
    o_p = o_g * 0 - 1
    c_cos = tl.zeros(o_g.shape, ACC)
    c_sin = tl.zeros(o_g.shape, ACC)
    for j in tl.static_range(LG):
        o_k = o_g >> (j + 1)
        last = (o_g & ((2 << j) - 1)) == (1 << j)
        c00, _, c10, _ = _blocks(coefs, d, R0 + j + 1, o_k, QUASI, ACC)
        o_p = tl.where(last, (1 << L) - (1 << (L - R0 - j)) + o_k, o_p)
        c_cos = tl.where(last, c00, c_cos)
        c_sin = tl.where(last, c10, c_sin)
    return o_p, c_cos[None, :], c_sin[None, :]


@triton.jit
def _partner(b_c, BLOCK_N: tl.constexpr, G: tl.constexpr, M: tl.constexpr):
    """The value of group ``g ^ M`` for every group ``g`` of ``b_c`` ``[BLOCK_N, G]``, bit-exact.

    An xor-sum over a size-2 axis leaves ``u ^ v`` on both sides; xoring it with one's own
    bits gives the partner's. Inside a warp that is one butterfly shuffle.
    """
    if b_c.dtype == tl.float64:
        bits = b_c.to(tl.int64, bitcast=True)
    else:
        bits = b_c.to(tl.int32, bitcast=True)
    bits = tl.reshape(bits, (BLOCK_N, G // (2 * M), 2, M))
    bits = tl.reshape(bits ^ xor_sum(bits, 2, True), (BLOCK_N, G))
    return bits.to(b_c.dtype, bitcast=True)


@triton.jit
def _vector_down(b_v, b_w, cs, BLOCK_N: tl.constexpr, G: tl.constexpr, E: tl.constexpr, LE: tl.constexpr):
    """``x @ P_LE @ ... @ P_1`` inside each vector of ``b_v`` ``[BLOCK_N, G, E]``, coarse stage first.

    ``b_w`` ``[BLOCK_N, G]`` replaces each vector's first column: its value after the coarser
    stages. Returns the result and, per stage (tuple index ``t - 1``), the pair operands
    ``lo`` (the running value at the left slots) and ``hi`` (the input at the right slots).
    """
    his = ()
    for t in tl.static_range(1, LE + 1):
        b_v, b_hi = tl.split(tl.reshape(b_v, (BLOCK_N, G, E >> t, 2)))
        his = his + (b_hi,)
    b_v = b_w[:, :, None]
    los = ()
    for t in tl.static_range(LE, 0, -1):
        c00, c01, c10, c11 = cs[t - 1]
        b_hi = his[t - 1]
        los = (b_v,) + los
        b_v = tl.reshape(tl.join(c00 * b_v + c10 * b_hi, c01 * b_v + c11 * b_hi), (BLOCK_N, G, E >> (t - 1)))
    return b_v, los, his


@triton.jit
def _vector_up(b_v, cs, BLOCK_N: tl.constexpr, G: tl.constexpr, E: tl.constexpr, LE: tl.constexpr):
    """``x @ P_1^T @ ... @ P_LE^T`` inside each vector, fine stage first.

    Returns the carry at each vector's first column ``[BLOCK_N, G]`` (final only if no
    coarser stage follows), the right slots' outputs per stage (final), and per stage the
    pair operands ``(v0, v1)``.
    """
    outs = ()
    v0s = ()
    v1s = ()
    for t in tl.static_range(1, LE + 1):
        c00, c01, c10, c11 = cs[t - 1]
        b_v0, b_v1 = tl.split(tl.reshape(b_v, (BLOCK_N, G, E >> t, 2)))
        v0s = v0s + (b_v0,)
        v1s = v1s + (b_v1,)
        outs = outs + (c10 * b_v0 + c11 * b_v1,)
        b_v = c00 * b_v0 + c01 * b_v1
    return tl.reshape(b_v, (BLOCK_N, G)), outs, v0s, v1s


@triton.jit
def _vector_merge(b_root, outs, BLOCK_N: tl.constexpr, G: tl.constexpr, E: tl.constexpr, LE: tl.constexpr):
    """Reassemble vectors from their first column ``b_root`` and :func:`_vector_up`'s outputs."""
    b_v = b_root[:, :, None]
    for t in tl.static_range(LE, 0, -1):
        b_v = tl.reshape(tl.join(b_v, outs[t - 1]), (BLOCK_N, G, E >> (t - 1)))
    return b_v


@triton.jit
def _chain(p_row, m_row, chain, NC: tl.constexpr, ACC: tl.constexpr):
    """Top-down along each root's ancestors: the value at every root after the coarser stages.

    ``p_row`` ``[BLOCK_N, 1]`` points at the rows' first columns (the tree's top), ``m_row``
    masks them. Returns the roots' values ``[BLOCK_N, G]`` and the operands ``(w, h)`` of the
    pair each root owns (zeros where it owns none).
    """
    b_w = tl.load(p_row, mask=m_row, other=0.0).to(ACC)
    b_wo = tl.zeros_like(b_w)
    b_ho = tl.zeros_like(b_w)
    for i in tl.static_range(NC):
        c_w, c_h, o_h, m_h, own = chain[i]
        b_h = tl.load(p_row + o_h, mask=m_row & m_h, other=0.0).to(ACC)
        b_wo = tl.where(own, b_w, b_wo)
        b_ho = tl.where(own, b_h, b_ho)
        b_w = c_w * b_w + c_h * b_h
    return b_w, b_wo, b_ho


@triton.jit
def _groups_up(b_c, ups, BLOCK_N: tl.constexpr, G: tl.constexpr, LG: tl.constexpr):
    """Bottom-up group stages on the roots' carries ``b_c`` ``[BLOCK_N, G]``.

    Returns the carry of group 0 (meaningful only there), the final outputs at the roots
    (group 0's entry is its carry), and the operands ``(left, right)`` of the pair each
    group owns (its partner's value and its own, at the stage where it is a right root).
    """
    b_out = b_c
    b_al = tl.zeros_like(b_c)
    b_ar = tl.zeros_like(b_c)
    for j in tl.static_range(LG):
        c_me, c_other, keep, last = ups[j]
        b_p = _partner(b_c, BLOCK_N, G, 1 << j)
        b_al = tl.where(last, b_p, b_al)
        b_ar = tl.where(last, b_c, b_ar)
        b_new = c_me * b_c + c_other * b_p
        b_out = tl.where(last, b_new, b_out)
        b_c = tl.where(keep, b_new, b_c)
    b_out = tl.where(tl.arange(0, G)[None, :] == 0, b_c, b_out)
    return b_c, b_out, b_al, b_ar


@triton.jit
def _chunk(coefs, scale, d, i_c, LE: tl.constexpr, LG: tl.constexpr, HAS_SCALE: tl.constexpr,
           QUASI: tl.constexpr, ACC: tl.constexpr):
    """What a program on chunk ``i_c`` loads once: its groups ``o_g`` ``[G]``, columns ``o_c``
    ``[G * E]`` and their mask, the scale as ``[1, G, E]`` (ones without one; unused then) and
    the vector stages' blocks (:func:`_vector_blocks`)."""
    E: tl.constexpr = 1 << LE
    G: tl.constexpr = 1 << LG
    o_g = i_c * G + tl.arange(0, G)
    o_c = i_c * (G * E) + tl.arange(0, G * E)
    m_c = o_c < d
    if HAS_SCALE:
        b_s = tl.reshape(tl.load(scale + o_c, mask=m_c, other=0.0), (1, G, E)).to(ACC)
    else:
        b_s = tl.full((1, G, E), 1.0, ACC)
    return o_g, o_c, m_c, b_s, _vector_blocks(coefs, d, o_g, E, LE, QUASI, ACC)


@triton.jit
def _rows(i_b, n_rows, BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """Row block ``i_b``'s rows (int64) and their mask (all true unless ``MASKED``: the last
    blocks, which may run past ``n_rows``)."""
    o_n = (i_b * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    if MASKED:
        m_n = o_n < n_rows
    else:
        m_n = o_n >= 0
    return o_n, m_n


@triton.jit
def _load_tile(p, o_n, stride, o_c, m_n, m_c, BLOCK_N: tl.constexpr, G: tl.constexpr, E: tl.constexpr,
               ACC: tl.constexpr):
    """Rows ``o_n`` of columns ``o_c`` as a ``[BLOCK_N, G, E]`` tile in ``ACC``.

    Loaded as ``[BLOCK_N, G * E]`` (contiguous columns), so that every Triton version gives
    each thread whole 16-byte vectors with its rows as register repetitions, then split.
    """
    b = tl.load(p + o_n[:, None] * stride + o_c[None, :], mask=m_n[:, None] & m_c[None, :], other=0.0)
    return tl.reshape(b, (BLOCK_N, G, E)).to(ACC)


@triton.jit
def _store_tile(p, o_n, stride, o_c, m_n, m_c, b, BLOCK_N: tl.constexpr, G: tl.constexpr, E: tl.constexpr):
    """Store a ``[BLOCK_N, G, E]`` tile (already in the output dtype) at rows ``o_n``, columns ``o_c``."""
    tl.store(p + o_n[:, None] * stride + o_c[None, :], tl.reshape(b, (BLOCK_N, G * E)),
             mask=m_n[:, None] & m_c[None, :])


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
