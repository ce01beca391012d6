"""Fused forward: all stages plus the scale in one pass over the activations.

``x @ R`` (top-down) is one launch: each program runs the chunk stages on the row's inputs
at the chunk roots (``_chunk_root``), then the group stages by exchanging the groups' first
columns across lanes, then its vectors' stages in registers. ``x @ R^T`` (bottom-up) runs
the vector stages, then the group stages by exchanging roots across lanes; with more than
one chunk per row the chunk roots go to a small fp32 buffer ``[rows, K]`` and
``_givens_fwd_roots_kernel`` finishes the coarse stages on them and writes
``y[:, ::chunk]``. With vectors of more than one column the scale is folded into stage 1's
blocks once per program.
"""
import torch
import triton
import triton.language as tl

from .launch import (
    MIXED_MAX_REGISTERS,
    acc_dtype,
    config,
    fit_grid,
    fit_roots,
    mixed_config,
    mixed_programs,
    new_output,
    on_gpu,
    roots_config,
    round_bf16,
    wide_words,
)
from .tree import (
    _chunk,
    _chunk_root,
    _down_blocks,
    _exchange_blocks,
    _first,
    _fold_scale,
    _gather,
    _groups_down,
    _groups_up,
    _load_raw,
    _rows,
    _store_tile,
    _tile,
    _to_output,
    _vector_down,
    _vector_merge,
    _vector_up,
)


@triton.jit
def _fwd_block(y, roots, o_n, m_n, i_c, stride_y, t_x, t_r, b_s, o_g, o_c, m_c, o_k, vector_cs, group_cs, downs_k,
               L: tl.constexpr, LE: tl.constexpr, LG: tl.constexpr, BLOCK_N: tl.constexpr, HAS_SCALE: tl.constexpr,
               TRANSPOSE: tl.constexpr, ACC: tl.constexpr, ROUND_BF16: tl.constexpr, MASKED: tl.constexpr):
    """One row block of :func:`_givens_fwd_kernel` from its loads: the ``x`` tile ``t_x`` and, for
    ``x @ R`` with several chunks, the inputs at the chunk roots ``t_r`` (``MASKED``: rows and
    columns may run past the tensor). ``group_cs``: the group stages' blocks, bottom-up
    (:func:`_exchange_blocks`) for ``x @ R^T``, top-down (:func:`_down_blocks`) for ``x @ R``.
    With ``LE > 0`` the scale is folded into ``vector_cs``; ``b_s`` is used only without.
    """
    E: tl.constexpr = 1 << LE
    G: tl.constexpr = 1 << LG
    K: tl.constexpr = 1 << (L - LE - LG)
    b_x = _tile(t_x, BLOCK_N, G, E, ACC)
    if TRANSPOSE:
        if HAS_SCALE and LE == 0:
            b_x = b_x * b_s
        b_c, outs, _, _ = _vector_up(b_x, vector_cs, BLOCK_N, G, E, LE)
        b_root, _, _ = _groups_up(b_c, group_cs, BLOCK_N, G, LG)
        if K > 1:
            # the chunk's root is final only after the coarse stages: the roots kernel
            # finishes it and overwrites y there
            if MASKED:
                m_root = m_n[:, None] & (tl.arange(0, G) == 0)[None, :]
            else:
                m_root = (tl.arange(0, G) == 0)[None, :]
            tl.store(roots + o_n[:, None] * K + i_c + 0 * o_g[None, :], b_root, mask=m_root)
        b_y = _vector_merge(b_root, outs, BLOCK_N, G, E, LE)
    else:
        # top-down: the chunk stages on the chunk roots give the chunk's first column, the
        # group stages exchange the groups' first columns, the vector stages run in registers
        b_top = _first(b_x, BLOCK_N, G, E, LE)
        if K > 1:
            b_top = tl.where(tl.arange(0, G)[None, :] == 0,
                             _chunk_root(t_r, downs_k, o_k, i_c, BLOCK_N, K, L - LE - LG, ACC)[:, None], b_top)
        b_w, _ = _groups_down(b_top, group_cs, BLOCK_N, G, LG)
        b_y, _, _, _ = _vector_down(b_x, b_w, vector_cs, BLOCK_N, G, E, LE)
        if HAS_SCALE and LE == 0:
            b_y = b_y * b_s
    _store_tile(y, o_n, stride_y, o_c, m_n, m_c, _to_output(b_y, y.dtype.element_ty, ROUND_BF16), BLOCK_N, G, E,
                MASKED)


@triton.jit
def _fwd_prologue(coefs, scale, d, i_c, L: tl.constexpr, LE: tl.constexpr, LG: tl.constexpr, QUASI: tl.constexpr,
                  HAS_SCALE: tl.constexpr, TRANSPOSE: tl.constexpr, ACC: tl.constexpr):
    """What a forward program on chunk ``i_c`` loads once, before its rows: the chunk's groups
    ``o_g``, columns ``o_c`` and mask, the scale ``b_s`` (folded into the vector stages' blocks
    when vectors hold more than one column), the vector and group stages' blocks, and for the
    chunk stages the chunk-root columns ``o_r`` and their blocks (:func:`_givens_fwd_kernel`)."""
    E: tl.constexpr = 1 << LE
    G: tl.constexpr = 1 << LG
    K: tl.constexpr = 1 << (L - LE - LG)
    o_g, o_c, m_c, b_s, vector_cs = _chunk(coefs, scale, d, i_c, LE, LG, HAS_SCALE, QUASI, ACC)
    if HAS_SCALE and LE > 0:
        vector_cs = _fold_scale(vector_cs, scale, d, o_g, E, LE, ACC)
    if TRANSPOSE:
        group_cs = _exchange_blocks(coefs, d, o_g, LG, LE, QUASI, ACC)
    else:
        group_cs = _down_blocks(coefs, d, o_g, LG, LE, QUASI, ACC)
    o_k = tl.arange(0, K)
    o_r = o_k * (G * E)
    m_r = o_r < d
    downs_k = _down_blocks(coefs, d, o_k, L - LE - LG, LE + LG, QUASI, ACC)
    return o_g, o_c, m_c, b_s, vector_cs, group_cs, o_k, o_r, m_r, downs_k


# the row loops' trip counts stay runtime values: one binary for every row count
@triton.jit(do_not_specialize=["n_full", "n_iters"])
def _givens_fwd_kernel(x, y, roots, coefs, scale, n_rows, d, stride_x, stride_y, n_full, n_iters,
                       L: tl.constexpr, LE: tl.constexpr, LG: tl.constexpr, BLOCK_N: tl.constexpr,
                       QUASI: tl.constexpr, HAS_SCALE: tl.constexpr, TRANSPOSE: tl.constexpr,
                       ACC: tl.constexpr, ROUND_BF16: tl.constexpr, STAGES: tl.constexpr, FULL: tl.constexpr,
                       WIDE: tl.constexpr):
    """``y = x @ R`` or ``x @ R^T`` on chunk ``program_id(1)`` of the rows of program ``program_id(0)``.

    Tile ``[BLOCK_N, G, E]`` (``G = 2**LG`` vectors of ``E = 2**LE`` columns); for ``x @ R`` with
    ``K`` chunks also the rows' inputs at the chunk roots ``[BLOCK_N, K]``. The program loads its
    coefficients once (``[G, E/2]``, ``[G, E/4]``, ... per vector stage, ``[G]`` per group stage,
    ``[K]`` per chunk stage) and walks row blocks ``program_id(0) + it * num_programs(0)``: the
    first ``n_full`` whole, their loads issued ``STAGES - 1`` blocks ahead by the compiler's
    software pipelining (asynchronous copies; ``WIDE``: the 16-bit chunk-root inputs read as
    words, so that they take that path too), the rest (up to ``n_iters``) masked. ``FULL``:
    ``d == 2**L``, so no column is masked.
    """
    K: tl.constexpr = 1 << (L - LE - LG)
    i_g, i_c = tl.program_id(0), tl.program_id(1)
    n_groups = tl.num_programs(0)
    o_g, o_c, m_c, b_s, vector_cs, group_cs, o_k, o_r, m_r, downs_k = _fwd_prologue(
        coefs, scale, d, i_c, L, LE, LG, QUASI, HAS_SCALE, TRANSPOSE, ACC)
    for it in tl.range(0, n_full, num_stages=STAGES):
        o_n, m_n = _rows(i_g + it * n_groups, n_rows, BLOCK_N, False)
        t_x, t_r = _fwd_loads(x, o_n, m_n, stride_x, o_c, m_c, o_r, m_r, K, TRANSPOSE, not FULL, WIDE)
        _fwd_block(y, roots, o_n, m_n, i_c, stride_y, t_x, t_r, b_s, o_g, o_c, m_c, o_k, vector_cs, group_cs,
                   downs_k, L, LE, LG, BLOCK_N, HAS_SCALE, TRANSPOSE, ACC, ROUND_BF16, not FULL)
    for it in range(n_full, n_iters):
        o_n, m_n = _rows(i_g + it * n_groups, n_rows, BLOCK_N, True)
        t_x, t_r = _fwd_loads(x, o_n, m_n, stride_x, o_c, m_c, o_r, m_r, K, TRANSPOSE, True, WIDE)
        _fwd_block(y, roots, o_n, m_n, i_c, stride_y, t_x, t_r, b_s, o_g, o_c, m_c, o_k, vector_cs, group_cs,
                   downs_k, L, LE, LG, BLOCK_N, HAS_SCALE, TRANSPOSE, ACC, ROUND_BF16, True)


@triton.jit
def _fwd_loads(x, o_n, m_n, stride_x, o_c, m_c, o_r, m_r, K: tl.constexpr, TRANSPOSE: tl.constexpr,
               MASKED: tl.constexpr, WIDE: tl.constexpr):
    """One row block's reads, as loaded: the tile ``[BLOCK_N, G * E]`` and, for ``x @ R`` with
    ``K > 1`` chunks, the inputs at the chunk roots ``o_r`` ``[BLOCK_N, K]`` (else an empty tuple)."""
    t_x = _load_raw(x, o_n, stride_x, o_c, m_n, m_c, MASKED)
    if TRANSPOSE or K == 1:
        t_r = ()
    else:
        t_r = _gather(x, o_n[:, None] * stride_x + o_r[None, :], m_n[:, None] & m_r[None, :] if MASKED else None, WIDE)
    return t_x, t_r


# the row loops' trip counts stay runtime values: one binary for every row count
@triton.jit(do_not_specialize=["n_iters"])
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
        b_out, _, _ = _groups_up(b_c, group_cs, BLOCK_N, K, L - R0)
        tl.store(y + o_n[:, None] * stride_y + (o_k << R0)[None, :],
                 _to_output(b_out, y.dtype.element_ty, ROUND_BF16), mask=m_n[:, None] & ((o_k << R0) < d)[None, :])


# the tile table is a runtime value: one binary for every batch
@triton.jit(do_not_specialize=["n_tiles"])
def _givens_fwd_mixed_kernel(x, y, coefs, scale, order, tiles, n_tiles, d, stride_x, stride_y, coefs_per_adapter,
                             L: tl.constexpr, LE: tl.constexpr, LG: tl.constexpr, BLOCK_N: tl.constexpr,
                             TILE_BLOCKS: tl.constexpr, QUASI: tl.constexpr,
                             HAS_SCALE: tl.constexpr, ACC: tl.constexpr, ROUND_BF16: tl.constexpr,
                             STAGES: tl.constexpr, WIDE: tl.constexpr, FULL: tl.constexpr):
    """``y = x @ R_a`` row by row, ``a`` the row's adapter, on chunk ``program_id(1)``: a mixed
    batch (:func:`givens_fwd_mixed`).

    ``tiles`` holds ``(first, rows, adapter)`` per tile, in ``order``'s order: the tile's rows
    are ``order[first : first + rows]``, at most ``TILE_BLOCKS`` blocks of ``BLOCK_N`` rows.
    Block ``j`` of tile ``t`` is slot ``t * TILE_BLOCKS + j`` (a slot past a short tile's rows
    is empty). The programs along ``program_id(0)`` are persistent (one wave): each walks one
    contiguous share of the slots, as segments of one adapter each (:func:`_mixed_segment`),
    so it loads an adapter's coefficients once per segment, not per tile. A program's first two
    segments run in code written out for each, software-pipelined; any further one (a share
    over adapters of few rows) runs in a loop, one block at a time: a software-pipelined loop
    inside a loop over segments kept more registers live than two 8-warp CTAs per
    multiprocessor allow.
    """
    i_p, i_c = tl.program_id(0), tl.program_id(1)
    n_programs = tl.num_programs(0)
    n_slots = n_tiles.to(tl.int64) * TILE_BLOCKS
    lo = ((i_p * n_slots) // n_programs).to(tl.int32)
    hi = (((i_p + 1) * n_slots) // n_programs).to(tl.int32)
    s = lo
    for _ in tl.static_range(2):
        if s < hi:
            s = _mixed_segment(x, y, coefs, scale, order, tiles, s, hi, i_c, d, stride_x, stride_y,
                               coefs_per_adapter, L, LE, LG, BLOCK_N, TILE_BLOCKS, QUASI, HAS_SCALE, ACC,
                               ROUND_BF16, STAGES, WIDE, FULL)
    while s < hi:
        s = _mixed_segment(x, y, coefs, scale, order, tiles, s, hi, i_c, d, stride_x, stride_y, coefs_per_adapter,
                           L, LE, LG, BLOCK_N, TILE_BLOCKS, QUASI, HAS_SCALE, ACC, ROUND_BF16, 1, WIDE, FULL)


@triton.jit
def _mixed_segment(x, y, coefs, scale, order, tiles, s, hi, i_c, d, stride_x, stride_y, coefs_per_adapter,
                   L: tl.constexpr, LE: tl.constexpr, LG: tl.constexpr, BLOCK_N: tl.constexpr,
                   TILE_BLOCKS: tl.constexpr, QUASI: tl.constexpr, HAS_SCALE: tl.constexpr,
                   ACC: tl.constexpr, ROUND_BF16: tl.constexpr, STAGES: tl.constexpr, WIDE: tl.constexpr,
                   FULL: tl.constexpr):
    """One segment of :func:`_givens_fwd_mixed_kernel`'s slots ``[s, hi)``: from slot ``s`` to the
    first tile of another adapter, or to ``hi``; returns where it ended.

    Adapter ``a >= 0``: its coefficients loaded once (from ``coefs + a * coefs_per_adapter``, the
    scale from ``scale + a * d``), then the blocks as :func:`_givens_fwd_kernel` walks its own,
    their loads (tile entry, ``order``, rows) issued ``STAGES - 1`` blocks ahead by the
    compiler's software pipelining, across tiles. Adapter ``-1``: the rows copied unchanged, bit
    for bit. ``FULL``: ``d == 2**L``, no column masks."""
    K: tl.constexpr = 1 << (L - LE - LG)
    C: tl.constexpr = (1 << LG) << LE
    t = s // TILE_BLOCKS
    t_last = (hi - 1) // TILE_BLOCKS
    adapter = tl.load(tiles + 3 * t + 2)
    # the next tiles of the same adapter, one load each (a vector of them would take a
    # reduction, which triton 3.6 compiles to shuffles with a divergent path)
    t_end = t + 1
    more = t_end <= t_last
    while more:
        same = tl.load(tiles + 3 * t_end + 2) == adapter
        t_end += same.to(tl.int32)
        more = same & (t_end <= t_last)
    end = tl.minimum(hi, t_end * TILE_BLOCKS)
    if adapter < 0:
        o_c = i_c * C + tl.arange(0, C)
        m_c = o_c < d
        for slot in range(s, end):
            t = slot // TILE_BLOCKS
            o_n, m_n = _tile_rows(order, tl.load(tiles + 3 * t), tl.load(tiles + 3 * t + 1), slot - t * TILE_BLOCKS,
                                  BLOCK_N)
            t_x = _load_raw(x, o_n, stride_x, o_c, m_n, m_c, True)
            tl.store(y + o_n[:, None] * stride_y + o_c[None, :], t_x, mask=m_n[:, None] & m_c[None, :])
    else:
        a_scale = scale
        if HAS_SCALE:
            a_scale = scale + adapter.to(tl.int64) * d
        # i_c itself (adapter >= 0), but not known to be the same in every segment: else the
        # compiler keeps what the prologue computes from i_c alone (the coefficients' addresses,
        # the exchanges' masks) live around a loop over segments, in registers
        i_v = tl.minimum(i_c, i_c + adapter)
        o_g, o_c, m_c, b_s, vector_cs, group_cs, o_k, o_r, m_r, downs_k = _fwd_prologue(
            coefs + adapter.to(tl.int64) * coefs_per_adapter, a_scale, d, i_v, L, LE, LG, QUASI, HAS_SCALE, False,
            ACC)
        if FULL:
            m_c = tl.full(o_c.shape, True, tl.int1)
            m_r = tl.full(o_r.shape, True, tl.int1)
        for slot in tl.range(s, end, num_stages=STAGES):
            t = slot // TILE_BLOCKS
            o_n, m_n = _tile_rows(order, tl.load(tiles + 3 * t), tl.load(tiles + 3 * t + 1), slot - t * TILE_BLOCKS,
                                  BLOCK_N)
            t_x, t_r = _fwd_loads(x, o_n, m_n, stride_x, o_c, m_c, o_r, m_r, K, False, True, WIDE)
            _fwd_block(y, y, o_n, m_n, i_c, stride_y, t_x, t_r, b_s, o_g, o_c, m_c, o_k, vector_cs, group_cs,
                       downs_k, L, LE, LG, BLOCK_N, HAS_SCALE, False, ACC, ROUND_BF16, True)
    return end


@triton.jit
def _tile_rows(order, first, n_rows, it, BLOCK_N: tl.constexpr):
    """Block ``it`` of a tile's rows: their indices in the batch (int64, read from ``order``) and mask."""
    o_p = it * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_p < n_rows
    o_n = tl.load(order + first + o_p, mask=m_n, other=0).to(tl.int64)
    return o_n, m_n


def givens_fwd(x: torch.Tensor, coefs: torch.Tensor, scale: torch.Tensor | None, *, quasi: bool,
               transpose: bool) -> torch.Tensor:
    """``x @ R`` (``transpose=False``) or ``x @ R^T`` for a 2-D ``x`` with unit column stride.

    ``coefs`` (contiguous) holds the blocks ``[P, 2, 2]`` when ``quasi``, else the angles ``[P]``
    (each program takes the cosines and sines it needs). Returns a new contiguous tensor of
    ``x``'s dtype.
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
    args = dict(x=x, y=y, roots=roots, coefs=coefs, scale=scale if scale is not None else coefs, n_rows=n_rows, d=d,
                stride_x=x.stride(0), stride_y=y.stride(0), L=L, LE=cfg.le, LG=cfg.lg, BLOCK_N=cfg.block_n,
                QUASI=quasi, HAS_SCALE=scale is not None, TRANSPOSE=transpose, ACC=acc, ROUND_BF16=rounding,
                STAGES=cfg.stages, FULL=d == 1 << L, WIDE=not transpose and K > 1 and wide_words(x))
    cfg = fit_grid(cfg, _givens_fwd_kernel, args, n_rows, n_chunks, x.device)
    _givens_fwd_kernel[(cfg.programs, n_chunks)](**args, n_full=cfg.n_full, n_iters=cfg.n_iters,
                                                 num_warps=cfg.num_warps)
    if transpose and K > 1:
        roots_args = dict(y=y, roots=roots, coefs=coefs, n_rows=n_rows, d=d, stride_y=y.stride(0), n_chunks=n_chunks,
                          L=L, R0=cfg.le + cfg.lg, QUASI=quasi, ACC=acc, ROUND_BF16=rounding)
        block_n, programs, n_iters, num_warps = fit_roots(roots_config(n_rows, K, x.device), _givens_fwd_roots_kernel,
                                                          roots_args, n_rows, x.device)
        _givens_fwd_roots_kernel[(programs,)](**roots_args, BLOCK_N=block_n, n_iters=n_iters, num_warps=num_warps)
    return y


def givens_fwd_mixed(x: torch.Tensor, coefs: torch.Tensor, scale: torch.Tensor | None, order: torch.Tensor,
                     tiles: torch.Tensor, *, quasi: bool, tile_rows: int) -> torch.Tensor:
    """``x @ R_a`` row by row for a 2-D ``x`` with unit column stride, ``a`` the row's adapter.

    ``coefs`` (contiguous) stacks the adapters' blocks ``[A, P, 2, 2]`` (``quasi``) or angles
    ``[A, P]``; ``scale`` is ``[A, d]`` or ``None``. ``order`` (int32) lists the rows grouped by
    adapter and ``tiles`` (int32 ``[T, 3]``) cuts it into tiles of one adapter each, of at most
    ``tile_rows`` rows (what ``qgoft_kernels.mixed.MixedBatch.tiles`` was asked for, once per
    batch). One launch of
    persistent programs, sized from the compiled kernel's occupancy (one wave), each walking a
    contiguous share of the tiles' row blocks.
    """
    n_rows, d = x.shape
    y = new_output((n_rows, d), x.dtype, x.device)
    n_tiles = tiles.shape[0]
    if n_rows == 0 or n_tiles == 0:
        return y
    L = (d - 1).bit_length()
    cfg = mixed_config(1 << L, n_rows, x.element_size(), x.device)
    n_chunks = triton.cdiv(d, cfg.chunk)
    K = (1 << L) // cfg.chunk
    tile_blocks = triton.cdiv(tile_rows, cfg.block_n)
    args = dict(x=x, y=y, coefs=coefs, scale=scale if scale is not None else coefs, order=order, tiles=tiles,
                n_tiles=n_tiles, d=d, stride_x=x.stride(0), stride_y=y.stride(0), coefs_per_adapter=coefs[0].numel(),
                L=L, LE=cfg.le, LG=cfg.lg, BLOCK_N=cfg.block_n, TILE_BLOCKS=tile_blocks, QUASI=quasi,
                HAS_SCALE=scale is not None, ACC=acc_dtype(x.dtype), ROUND_BF16=round_bf16(x), STAGES=cfg.stages,
                WIDE=K > 1 and wide_words(x), FULL=d == 1 << L, num_warps=cfg.num_warps)
    if on_gpu(x.device):
        args["maxnreg"] = MIXED_MAX_REGISTERS
    programs = mixed_programs(_givens_fwd_mixed_kernel, args, n_tiles * tile_blocks, n_chunks, cfg, x.device)
    _givens_fwd_mixed_kernel[(programs, n_chunks)](**args)
    return y
