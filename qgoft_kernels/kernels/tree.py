"""Building blocks of the kernels: the tree's stages on a tile of thread vectors.

A program's tile is ``[BLOCK_N, G, E]``: ``BLOCK_N`` rows, ``G`` *groups* of ``E``
contiguous columns each (``E`` is one 16-byte vector of the input dtype). Triton gives each
thread whole vectors (its rows are register repetitions), so the tree splits in three:

- **vector stages** ``1 .. LE`` (``E = 2**LE``) pair columns inside one vector: register
  arithmetic on the compact even/odd split, no data movement between threads;
- **group stages** ``LE + 1 .. LE + LG`` pair the *roots* of groups (a group's first
  column). Both sweeps meet a partner's value by exchanging one value across lanes
  (``_partner``: a butterfly shuffle inside a warp, shared memory across warps):
  bottom-up (``x @ R^T``, ``_groups_up``) on the roots' carries, top-down (``x @ R``,
  ``_groups_down``) on the roots' inputs, coarse stage first;
- **chunk stages** above ``LE + LG`` pair the roots of whole chunks (``G * E`` columns).
  Top-down each program runs them on the row's chunk-root inputs (``_chunk_root``, a
  ``[BLOCK_N, K]`` tile); bottom-up a second, small launch finishes them on the chunk
  roots, which are groups of a tile with ``E = 1``.

Offsets and pair counts come from the closed form, so no per-stage scalar is loaded; the
coefficients are loaded once per program and stay in registers while it walks its rows.
docs/math.md derives the schedule and the gradients.
"""
import triton
import triton.language as tl


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
def _load_blocks(coefs, d, r: tl.constexpr, o_k, QUASI: tl.constexpr):
    """Stage ``r``'s parameters for slots ``o_k``, as loaded: the four entries of each block
    ``[P, 2, 2]`` (quasi) or its angle ``[P]`` (givens). Slots past the stage's pair count get
    the identity (a zero angle)."""
    m_k = o_k < _count(d, r)
    p = _offset(d, r) + o_k
    if QUASI:
        p_c = coefs + p * 4
        return (tl.load(p_c, mask=m_k, other=1.0), tl.load(p_c + 1, mask=m_k, other=0.0),
                tl.load(p_c + 2, mask=m_k, other=0.0), tl.load(p_c + 3, mask=m_k, other=1.0))
    else:
        return tl.load(coefs + p, mask=m_k, other=0.0)


@triton.jit
def _block_values(raw, QUASI: tl.constexpr, ACC: tl.constexpr):
    """The blocks ``(c00, c01, c10, c11)`` in ``ACC`` from :func:`_load_blocks`' ``raw`` (givens:
    ``[[cos, -sin], [sin, cos]]``, taken once per program)."""
    if QUASI:
        return raw[0].to(ACC), raw[1].to(ACC), raw[2].to(ACC), raw[3].to(ACC)
    else:
        theta = raw.to(ACC)
        c00 = tl.cos(theta)
        c10 = tl.sin(theta)
        return c00, -c10, c10, c00


@triton.jit
def _group_blocks(coefs, d, o_g, LG: tl.constexpr, R0: tl.constexpr, QUASI: tl.constexpr, ACC: tl.constexpr):
    """The blocks of group stages ``R0 + 1 .. R0 + LG`` for the pairs over groups ``o_g``, per stage.

    Every stage's parameters are loaded before any is converted: a strict rotation's ``cos``
    and ``sin`` branch (libdevice's rare slow path), and the compiler does not move a load
    across a branch, so loads interleaved with them would each wait a round trip to L2."""
    raws = ()
    for j in tl.static_range(LG):
        raws = raws + (_load_blocks(coefs, d, R0 + j + 1, o_g >> (j + 1), QUASI),)
    out = ()
    for j in tl.static_range(LG):
        out = out + (_block_values(raws[j], QUASI, ACC),)
    return out


@triton.jit
def _vector_blocks(coefs, d, o_g, E: tl.constexpr, LE: tl.constexpr, QUASI: tl.constexpr, ACC: tl.constexpr):
    """Per vector stage ``t`` (tuple index ``t - 1``), the blocks of groups ``o_g``, each ``[1, G, E >> t]``
    (loaded first, then converted, as in :func:`_group_blocks`)."""
    raws = ()
    for t in tl.static_range(1, LE + 1):
        o_k = o_g[:, None] * (E >> t) + tl.arange(0, E >> t)[None, :]
        raws = raws + (_load_blocks(coefs, d, t, o_k, QUASI),)
    out = ()
    for t in tl.static_range(1, LE + 1):
        c00, c01, c10, c11 = _block_values(raws[t - 1], QUASI, ACC)
        out = out + ((c00[None], c01[None], c10[None], c11[None]),)
    return out


@triton.jit
def _exchange_blocks(coefs, d, o_g, LG: tl.constexpr, R0: tl.constexpr, QUASI: tl.constexpr, ACC: tl.constexpr):
    """The bottom-up group stages ``R0 + 1 .. R0 + LG`` seen from group ``o_g`` (global index).

    Per stage (tuple index ``j``, stride ``2**j`` groups): ``(c_me, c_other, last)``, each
    ``[1, G]``. With ``u`` this group's value and ``v`` its partner's (group ``o_g ^ 2**j``), the
    stage leaves ``c_me * u + c_other * v``: the carry of a left root, the final output of a
    right root (``last``: it owns the pair's gradient). A group that is no root at this stride
    gets ``(1, 0)`` and keeps its value, so after its own stage a group holds its output.
    """
    return _exchange_from(_group_blocks(coefs, d, o_g, LG, R0, QUASI, ACC), o_g, LG)


@triton.jit
def _exchange_from(blocks, o_g, LG: tl.constexpr):
    """:func:`_exchange_blocks` from the stages' blocks (:func:`_group_blocks`)."""
    out = ()
    for j in tl.static_range(LG):
        c00, c01, c10, c11 = blocks[j]
        right = ((o_g >> j) & 1) == 1
        root = (o_g & ((1 << j) - 1)) == 0
        out = out + ((tl.where(root, tl.where(right, c11, c00), 1.0)[None, :],
                      tl.where(root, tl.where(right, c10, c01), 0.0)[None, :], (root & right)[None, :]),)
    return out


@triton.jit
def _down_blocks(coefs, d, o_g, LG: tl.constexpr, R0: tl.constexpr, QUASI: tl.constexpr, ACC: tl.constexpr):
    """The top-down group stages ``R0 + LG .. R0 + 1`` seen from group ``o_g`` (global index).

    Per stage (tuple index ``j``, stride ``2**j`` groups): ``(c_me, c_other, own)``, each
    ``[1, G]``. A group is a root at that stride when its low ``j`` bits are clear; with ``u``
    its value and ``v`` its partner's (group ``o_g ^ 2**j``), the stage gives it ``c_me * u +
    c_other * v``: the left root carries ``a00 u + a10 v``, the right root (``own``: it owns
    the pair's gradient) starts its subtree at ``a01 v + a11 u``. Other groups get ``(1, 0)``
    and keep their value (their input, which no coarser stage touches).
    """
    return _down_from(_group_blocks(coefs, d, o_g, LG, R0, QUASI, ACC), o_g, LG)


@triton.jit
def _down_from(blocks, o_g, LG: tl.constexpr):
    """:func:`_down_blocks` from the stages' blocks (:func:`_group_blocks`)."""
    out = ()
    for j in tl.static_range(LG):
        c00, c01, c10, c11 = blocks[j]
        right = ((o_g >> j) & 1) == 1
        part = (o_g & ((1 << j) - 1)) == 0
        out = out + ((tl.where(part, tl.where(right, c11, c00), 1.0)[None, :],
                      tl.where(part, tl.where(right, c01, c10), 0.0)[None, :], (part & right)[None, :]),)
    return out


@triton.jit
def _owned_pair(blocks, o_g, L: tl.constexpr, LG: tl.constexpr, R0: tl.constexpr, ACC: tl.constexpr):
    """The pair of the group stages ``R0 + 1 .. R0 + LG`` (``blocks``: :func:`_group_blocks`) that
    group ``o_g`` owns (it is its right root).

    Returns its padded slot (stage ``r`` has ``2**(L - r)`` slots, stage 1 first; ``-1`` where
    the group owns none, as group 0 does) and its ``(cos, sin)`` for angle gradients.
    """
    o_p = o_g * 0 - 1
    c_cos = tl.zeros(o_g.shape, ACC)
    c_sin = tl.zeros(o_g.shape, ACC)
    for j in tl.static_range(LG):
        o_k = o_g >> (j + 1)
        last = (o_g & ((2 << j) - 1)) == (1 << j)
        c00, _, c10, _ = blocks[j]
        o_p = tl.where(last, (1 << L) - (1 << (L - R0 - j)) + o_k, o_p)
        c_cos = tl.where(last, c00, c_cos)
        c_sin = tl.where(last, c10, c_sin)
    return o_p, c_cos[None, :], c_sin[None, :]


@triton.jit
def _partner(b_c, BLOCK_N: tl.constexpr, G: tl.constexpr, M: tl.constexpr):
    """The value of group ``g ^ M`` for every group ``g`` of ``b_c`` ``[BLOCK_N, G]``, bit-exact.

    The sum of the two values' bits as unsigned integers over a size-2 axis (wrapping) leaves
    ``u + v`` on both sides; less one's own bits, it is the partner's. Inside a warp that is
    one butterfly shuffle (and the interpreter runs the sum natively, not element by element).
    """
    if b_c.dtype == tl.float64:
        bits = b_c.to(tl.uint64, bitcast=True)
    else:
        bits = b_c.to(tl.uint32, bitcast=True)
    bits = tl.reshape(bits, (BLOCK_N, G // (2 * M), 2, M))
    bits = tl.reshape(tl.sum(bits, 2, keep_dims=True) - bits, (BLOCK_N, G))
    return bits.to(b_c.dtype, bitcast=True)


@triton.jit
def _first(b_v, BLOCK_N: tl.constexpr, G: tl.constexpr, E: tl.constexpr, LE: tl.constexpr):
    """Each vector's first column of ``b_v`` ``[BLOCK_N, G, E]``, as ``[BLOCK_N, G]``."""
    for t in tl.static_range(1, LE + 1):
        b_v, _ = tl.split(tl.reshape(b_v, (BLOCK_N, G, E >> t, 2)))
    return tl.reshape(b_v, (BLOCK_N, G))


@triton.jit
def _vector_down(b_v, b_w, cs, BLOCK_N: tl.constexpr, G: tl.constexpr, E: tl.constexpr, LE: tl.constexpr):
    """``x @ P_LE @ ... @ P_1`` inside each vector of ``b_v`` ``[BLOCK_N, G, E]``, coarse stage first.

    ``b_w`` ``[BLOCK_N, G]`` replaces each vector's first column: its value after the coarser
    stages. Returns the result, per stage (tuple index ``t - 1``) the pair operands ``lo``
    (the running value at the left slots) and ``hi`` (the input at the right slots), and the
    first column's input ``[BLOCK_N, G]``.
    """
    his = ()
    for t in tl.static_range(1, LE + 1):
        b_v, b_hi = tl.split(tl.reshape(b_v, (BLOCK_N, G, E >> t, 2)))
        his = his + (b_hi,)
    b_first = tl.reshape(b_v, (BLOCK_N, G))
    b_v = b_w[:, :, None]
    los = ()
    for t in tl.static_range(LE, 0, -1):
        c00, c01, c10, c11 = cs[t - 1]
        b_hi = his[t - 1]
        los = (b_v,) + los
        b_v = tl.reshape(tl.join(c00 * b_v + c10 * b_hi, c01 * b_v + c11 * b_hi), (BLOCK_N, G, E >> (t - 1)))
    return b_v, los, his, b_first


@triton.jit
def _vector_up(b_v, cs, BLOCK_N: tl.constexpr, G: tl.constexpr, E: tl.constexpr, LE: tl.constexpr,
               pair_scale=None):
    """``x @ P_1^T @ ... @ P_LE^T`` inside each vector, fine stage first (``x @ diag(s) @ P_1^T
    ...`` with ``pair_scale``: the scale at stage 1's left and right columns, in its blocks'
    layout, which multiplies the columns as they split).

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
        if t == 1 and pair_scale is not None:
            b_v0 = b_v0 * pair_scale[0]
            b_v1 = b_v1 * pair_scale[1]
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
def _gather(base, o, mask, WIDE: tl.constexpr):
    """``base[o]`` (``mask``: where to load, zeros elsewhere; ``None``: everywhere). ``WIDE``: a
    16-bit ``base`` at even ``o`` (4-byte aligned) read as the 32-bit word starting there, so that
    the compiler's software pipelining can copy it asynchronously (it copies 4 bytes or more)."""
    if WIDE:
        p = base.to(tl.pointer_type(tl.uint32), bitcast=True) + (o >> 1)
        if mask is None:
            w = tl.load(p)
        else:
            w = tl.load(p, mask=mask, other=0)
        return (w & 0xFFFF).to(tl.uint16).to(base.dtype.element_ty, bitcast=True)
    elif mask is None:
        return tl.load(base + o)
    else:
        return tl.load(base + o, mask=mask, other=0.0)


@triton.jit
def _groups_up(b_c, ups, BLOCK_N: tl.constexpr, G: tl.constexpr, LG: tl.constexpr):
    """Bottom-up group stages on the roots' carries ``b_c`` ``[BLOCK_N, G]``.

    Returns the groups' values after the stages (group 0: the carry, each other group: its
    final output at its root) and the operands ``(left, right)`` of the pair each group owns
    (its partner's value and its own, at the stage where it is a right root).
    """
    b_al = tl.zeros_like(b_c)
    b_ar = tl.zeros_like(b_c)
    for j in tl.static_range(LG):
        c_me, c_other, last = ups[j]
        b_p = _partner(b_c, BLOCK_N, G, 1 << j)
        b_al = tl.where(last, b_p, b_al)
        b_ar = tl.where(last, b_c, b_ar)
        b_c = c_me * b_c + c_other * b_p
    return b_c, b_al, b_ar


@triton.jit
def _groups_down(b_v, downs, BLOCK_N: tl.constexpr, G: tl.constexpr, LG: tl.constexpr):
    """Top-down group stages on ``b_v`` ``[BLOCK_N, G]``, coarse stage first: each group's input
    at its first column (group 0: its value after the coarser stages).

    Returns each group's value after the group stages (what enters its vector) and the left
    operand ``w`` of the pair each group owns, the value its partner carried into that stage
    (its right operand is the group's own input).
    """
    b_wo = tl.zeros_like(b_v)
    for j in tl.static_range(LG - 1, -1, -1):
        c_me, c_other, own = downs[j]
        b_p = _partner(b_v, BLOCK_N, G, 1 << j)
        b_wo = tl.where(own, b_p, b_wo)
        b_v = c_me * b_v + c_other * b_p
    return b_v, b_wo


@triton.jit
def _chunk_root(t_r, downs_k, o_k, i_c, BLOCK_N: tl.constexpr, K: tl.constexpr, LK: tl.constexpr,
                ACC: tl.constexpr):
    """The value entering chunk ``i_c``'s first column after the chunk stages ``[BLOCK_N]``: the
    top-down chunk stages on the rows' inputs at the chunk roots ``t_r`` ``[BLOCK_N, K]``."""
    b_r, _ = _groups_down(t_r.to(ACC), downs_k, BLOCK_N, K, LK)
    return tl.sum(tl.where(o_k[None, :] == i_c, b_r, 0.0), axis=1)


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
def _pair_scale(scale, d, o_g, E: tl.constexpr, ACC: tl.constexpr):
    """The scale at stage 1's left and right columns ``(s_i, s_{i+1})``, each ``[1, G, E/2]`` as
    stage 1's blocks are (no tile-shaped load whose layout would pull the tiles' along)."""
    o_i = 2 * (o_g[:, None] * (E >> 1) + tl.arange(0, E >> 1)[None, :])
    s_i = tl.load(scale + o_i, mask=o_i < d, other=0.0).to(ACC)[None]
    s_j = tl.load(scale + o_i + 1, mask=o_i + 1 < d, other=0.0).to(ACC)[None]
    return s_i, s_j


@triton.jit
def _fold_scale(cs, scale, d, o_g, E: tl.constexpr, LE: tl.constexpr, ACC: tl.constexpr):
    """The vector stages' blocks with ``diag(scale)`` folded into stage 1.

    ``x @ R`` scales stage 1's outputs and ``x @ R^T`` its inputs; either way stage 1's pair
    ``(i, i + 1)`` becomes ``[[c00 s_i, c01 s_{i+1}], [c10 s_i, c11 s_{i+1}]]`` (``c01``, ``c11``
    act on the right column), so no multiply by the scale is left in the row loop.
    """
    s_i, s_j = _pair_scale(scale, d, o_g, E, ACC)
    c00, c01, c10, c11 = cs[0]
    out = ((c00 * s_i, c01 * s_j, c10 * s_i, c11 * s_j),)
    for t in tl.static_range(1, LE):
        out = out + (cs[t],)
    return out


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
def _load_raw(p, o_n, stride, o_c, m_n, m_c, MASKED: tl.constexpr):
    """Rows ``o_n`` of columns ``o_c`` as loaded, ``[BLOCK_N, G * E]`` in the input's dtype
    (masked by ``m_n`` and ``m_c`` where ``MASKED``).

    Loaded as contiguous columns, so that every Triton version gives each thread whole
    16-byte vectors with its rows as register repetitions (:func:`_tile` splits them).
    """
    p_t = p + o_n[:, None] * stride + o_c[None, :]
    if MASKED:
        b = tl.load(p_t, mask=m_n[:, None] & m_c[None, :], other=0.0)
    else:
        b = tl.load(p_t)
    return b


@triton.jit
def _tile(b, BLOCK_N: tl.constexpr, G: tl.constexpr, E: tl.constexpr, ACC: tl.constexpr):
    """A loaded ``[BLOCK_N, G * E]`` as the ``[BLOCK_N, G, E]`` tile in ``ACC``."""
    return tl.reshape(b, (BLOCK_N, G, E)).to(ACC)


@triton.jit
def _store_tile(p, o_n, stride, o_c, m_n, m_c, b, BLOCK_N: tl.constexpr, G: tl.constexpr, E: tl.constexpr,
                MASKED: tl.constexpr):
    """Store a ``[BLOCK_N, G, E]`` tile (already in the output dtype) at rows ``o_n``, columns ``o_c``."""
    p_t = p + o_n[:, None] * stride + o_c[None, :]
    if MASKED:
        tl.store(p_t, tl.reshape(b, (BLOCK_N, G * E)), mask=m_n[:, None] & m_c[None, :])
    else:
        tl.store(p_t, tl.reshape(b, (BLOCK_N, G * E)))


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
