"""The dense formulation of the PyTorch path: ``R`` as dense factors applied with BLAS.

The tree's first ``m`` stages only pair indices inside aligned groups of ``b = 2**m``, so
their product is block-diagonal with ``nb = ceil(d / b)`` dense ``b x b`` blocks (the
scale folded into their columns). The later stages only pair the groups' first indices,
the *roots*, and act on them as a dense ``nb x nb`` matrix ``Q`` (a tree over ``nb``
indices). So ``x @ R`` is ``Q`` on the roots, then one batched matmul with the blocks
(docs/math.md §5). With ``b >= 2**L`` there is one block: the dense ``R`` itself.

Both factors come from a closed form, not from products of stage matrices: an entry of a
tree product is a product of block entries along a path of the tree, so a gather, a
``cumprod`` and a scatter build them (:func:`_build`, ``d (m + 1)`` values). The
application works on the rows' own layout, with no copy of the activations
(:class:`DenseRotation`); ``GivensLinear`` fuses it with its frozen layer and rotates the
rows of ``W`` instead when that is cheaper (:class:`DenseLinear`). Both backwards
are batched matmuls: nothing per stage is saved, and every reduction is a BLAS call or a
serial ``index_add_`` (deterministic). On the CPU, :class:`DenseLinear`'s passes over the
rows run as compiled kernels where they are built (:mod:`qgoft_kernels.native`, docs/math.md §6).
"""
from __future__ import annotations

import functools
import math
import threading
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from . import native
from .schedule import num_stages, param_offsets, stage_counts

#: Block width when nothing pins it (``QGOFT_DENSE_BLOCK``); measured in docs/benchmarks.md.
DEFAULT_BLOCK = 32


def layout(d: int, block_width: int) -> tuple[int, int, int]:
    """``(m, b, nb)`` for ``d`` features: ``m`` block stages, blocks of ``b = 2**m`` (at most
    ``2**L``), and ``nb = ceil(d / b)`` blocks."""
    m = min(max(block_width, 1).bit_length() - 1, num_stages(d))
    return m, 1 << m, -(-d // (1 << m))


def _factor_indices(d: int, structure: str, block_width: int, scaled: bool, device: torch.device):
    """Where every nonzero of the blocks and of ``Q`` comes from and goes to (docs/math.md §5).

    Both factors are tree products: the blocks of stages ``1 .. m`` over the columns
    ``c < nb * b``, and ``Q`` of stages ``m + 1 .. L`` over the roots ``c * b``. In a tree
    product of ``k`` stages, column ``c`` has ``k + 1`` nonzeros: row 0 holds
    ``prod_l C[c, l]`` and the row stage ``t + 1`` pairs with its block's first index holds
    ``H[c, t] prod_{l <= t} C[c, l]``, where ``C[c, l]`` is entry ``[0, bit]`` and ``H[c, t]``
    entry ``[1, bit]`` of the block holding ``c`` (``bit``: the side of the pair ``c`` is on).
    With the scale as a leading factor ``C[c, 0]``, every value is ``H * cumprod(C)``.

    Returns flat indices into ``source = cat(blocks.flatten(), [1, 0, 0, 1], scale)``
    (absent pairs, padding and the unused factors read the identity's ones) for ``C`` and
    ``H``, as one ``[N, 2, K + 1]`` gather (``N`` columns of both trees, ``K`` their larger
    stage count); the position of each value in ``cat(blocks.flatten(), Q.flatten(),
    spare)``: the values a shorter tree does not have, or that fall past ``nb``, go to spare
    slots of their own; where the spare slots start; and that buffer's length.
    """
    L = num_stages(d)
    m, b, nb = layout(d, block_width)
    counts, offsets = stage_counts(d, structure), param_offsets(d, structure)
    one = 4 * offsets[-1]
    roots = 1 << (L - m) if nb > 1 else 0
    K = max(m, L - m if nb > 1 else 0)

    def tree(first: int, levels: int, cols: int, width: int, limit: int, base: int, with_scale: bool):
        c = torch.arange(cols)
        idx_c, idx_h, pos = [], [], []
        # the leading factor: the scale of column c (the blocks only), else 1
        idx_c.append(torch.where(c < d, one + 4 + c, one) if with_scale else torch.full_like(c, one))
        for level in range(1, K + 1):
            if level > levels:
                idx_c.append(torch.full_like(c, one))
                idx_h.append(torch.full_like(c, one))
                continue
            slot, bit = c >> level, (c >> (level - 1)) & 1
            stage = first + level
            real = 4 * (offsets[stage - 1] + slot)
            present = slot < counts[stage - 1]
            idx_c.append(torch.where(present, real + bit, one + bit))
            idx_h.append(torch.where(present, real + 2 + bit, one + 2 + bit))
        idx_h.append(torch.full_like(c, one))
        local, block = c % width, c // width
        for t in range(K + 1):
            if t < levels:
                row = ((local >> (t + 1)) << (t + 1)) + (1 << t)
            elif t == levels:
                row = torch.zeros_like(c)
            else:
                pos.append(torch.full_like(c, -1))
                continue
            keep = (row < limit) & (local < limit)
            pos.append(torch.where(keep, base + block * width * width + row * min(width, limit) + local, -1))
        return torch.stack(idx_c, 1), torch.stack(idx_h, 1), torch.stack(pos, 1)

    parts = [tree(0, m, nb * b, b, b, 0, scaled)]
    if nb > 1:
        parts.append(tree(m, L - m, roots, roots, nb, nb * b * b, False))
    idx_c, idx_h, pos = (torch.cat(t) for t in zip(*parts))
    pos = pos.reshape(-1)
    used = nb * b * b + (nb * nb if nb > 1 else 0)
    # a spare value's slot follows from its own index: no size that depends on data (the
    # compiler traces this function)
    pos = torch.where(pos < 0, used + torch.arange(pos.numel()), pos)
    return torch.stack((idx_c, idx_h), 1).to(device), pos.to(device), used, used + pos.numel()


def _givens_indices(indices, count: int, dtype: torch.dtype):
    """:func:`_factor_indices`' gather for ``count`` Givens angles, read from ``cat(cos, sin,
    [1, 0, 0, 1], scale)`` instead of the blocks' entries ``[cos, -sin, sin, cos]``, and the
    sign that this takes out of each prefix product.

    An angle's entries are ``cos``, ``-sin``, ``sin``, ``cos``; only ``-sin`` is negative, and
    only the factors ``C`` read it (``H`` reads entries 2 and 3). So ``C`` reads ``sin`` where
    it read ``-sin``, and ``cumprod(C)`` is off by the product of those signs so far, a fixed
    ``[N, K + 1]`` table of ``+-1`` (``sign``). No ``-sin`` and no ``[count, 4]`` stack to make.
    """
    gather, pos, used, size = indices
    entry = gather < 4 * count
    angle, kind = gather // 4, gather % 4
    trig = torch.where(entry, torch.where((kind == 1) | (kind == 2), count + angle, angle), gather - 2 * count)
    negative = entry[:, 0] & (kind[:, 0] == 1)
    sign = torch.cumprod(torch.where(negative, -1.0, 1.0).to(dtype), 1)
    return trig, pos, used, size, sign


def _transposed_positions(pos: torch.Tensor, nb: int, b: int, used: int) -> torch.Tensor:
    """Where each of :func:`_factor_indices`' positions lies in ``cat(blocks^T, Q^T, spare)``."""
    n = nb * b * b
    block, within = pos // (b * b), pos % (b * b)
    root = pos - n
    return torch.where(pos < n, block * b * b + within % b * b + within // b,
                       torch.where(pos < used, n + root % nb * nb + root // nb, pos))


@functools.lru_cache(maxsize=None)
def _indices(d: int, structure: str, block_width: int, scaled: bool, givens: bool, dtype: torch.dtype,
             device: torch.device):
    """``(gather, pos, used, size, sign, pos_t)`` for :func:`_build`: :func:`_factor_indices`,
    and for ``givens`` its gather into the angles' cosines and sines with the signs that
    takes out (:func:`_givens_indices`; ``sign`` is ``None`` otherwise), and the positions in
    the transposed factors (:func:`_transposed_positions`). Cached per layout; the compiler
    traces ``_indices.__wrapped__``."""
    # cached tensors are made outside inference mode, also when the first call is inside it:
    # the double backward saves them (an inference tensor cannot be saved)
    with nullcontext() if torch.compiler.is_compiling() else torch.inference_mode(False):
        indices = _factor_indices(d, structure, block_width, scaled, device)
        if givens:
            indices = _givens_indices(indices, param_offsets(d, structure)[-1], dtype)
        else:
            indices = (*indices, None)
        _, b, nb = layout(d, block_width)
        gather, pos, used, size, sign = indices
        return gather.contiguous(), pos.contiguous(), used, size, sign, _transposed_positions(pos, nb, b, used)


def _fake_mode() -> bool:
    """Whether a ``FakeTensorMode`` is active: tensors made now would be fakes."""
    return torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None


def _layout_indices(d: int, structure: str, block_width: int, scaled: bool, givens: bool, dtype: torch.dtype,
                    device: torch.device):
    """:func:`_indices`, from its cache; made afresh where they are traced (the compiler, which
    would ignore the cache anyway, with a warning) or would be fakes (``FakeTensorMode``: kept
    in the cache, they would poison later calls on real tensors)."""
    if torch.compiler.is_compiling() or _fake_mode():
        return _indices.__wrapped__(d, structure, block_width, scaled, givens, dtype, device)
    return _indices(d, structure, block_width, scaled, givens, dtype, device)


def _source(params: torch.Tensor, scale: torch.Tensor | None, givens: bool, dtype: torch.dtype) -> torch.Tensor:
    """Every value the factors' entries are products of: the blocks' entries (the angles'
    cosines, then their sines, for ``givens``; :func:`_givens_indices`), the identity's ``[1,
    0, 0, 1]``, the scale."""
    if givens:
        angles = params.to(dtype)
        pieces = [torch.cos(angles), torch.sin(angles)]
    else:
        pieces = [params.to(dtype).reshape(-1)]
    pieces.append(pieces[0].new_tensor([1.0, 0.0, 0.0, 1.0]))
    if scale is not None:
        pieces.append(scale.to(dtype))
    return torch.cat(pieces)


def _factor_values(params, scale, givens: bool, dtype: torch.dtype, indices, nb: int, b: int):
    """``(blocks, Q)`` from the parameters in plain differentiable ops (what the compiler traces
    and the double backwards differentiate; :func:`_build` is the same map)."""
    gather, pos, _, size, sign, _ = indices
    CH = _source(params, scale, givens, dtype)[gather]
    values = CH[:, 1] * torch.cumprod(CH[:, 0], 1)
    if sign is not None:
        values = values * sign
    return _split(values.new_zeros(size).index_put((pos,), values.reshape(-1)), nb, b)


def _split(flat: torch.Tensor, nb: int, b: int):
    """``(blocks, Q)`` as views of the scattered values: ``nb`` blocks ``b x b``, then ``Q``."""
    n = nb * b * b
    return flat[:n].view(nb, b, b), (flat[n:n + nb * nb].view(nb, nb) if nb > 1 else None)


def _build(params, scale, givens: bool, dtype: torch.dtype, indices, transposed: bool = False):
    """``(flat, flat_t, saved, compiled)``: both factors' values as one flat buffer,
    ``cat(blocks.flatten(), Q.flatten(), spare)`` (:func:`_split` views it), with
    ``transposed`` the same for the transposed factors (else ``None``), what
    :func:`_build_backward` needs, and whether the compiled kernels made them (the backward
    takes the same way: ``QGOFT_NATIVE`` may have changed in between).

    ``flat[pos] = H * cumprod(C)``: one gather of ``C`` and ``H`` from ``source``
    (:func:`_factor_indices`), one ``cumprod``, one scatter. On the CPU that is one call of
    the compiled kernels (:func:`qgoft_kernels.native.build`) where they are built: a dozen
    small ops cost more than the values, the more so with the caches cold after the layer's
    matmuls.
    """
    gather, pos, _, size, sign, pos_t = indices
    if native.builds(params, scale, dtype, gather.shape[-1]):
        return (*native.build(params, scale, givens, gather, pos, sign, size, pos_t if transposed else None), True)
    source = _source(params, scale, givens, dtype)
    CH = source.index_select(0, gather.view(-1)).view(gather.shape)
    P = torch.cumprod(CH[:, 0], 1)
    values = CH[:, 1] * P
    if sign is not None:
        values.mul_(sign)
    flat = values.new_zeros(size).index_put_((pos,), values.view(-1))
    flat_t = values.new_zeros(size).index_put_((pos_t,), values.view(-1)) if transposed else None
    return flat, flat_t, (source, CH, P), False


def _build_backward(dflat, saved, params, scale, givens: bool, indices, want_params: bool, want_scale: bool,
                    compiled: bool):
    """``(dparams, dscale)`` from ``dflat``, the gradient of :func:`_build`'s buffer (zero in
    its spare slots), by the compiled kernels where :func:`_build` used them (``compiled``),
    else by hand: autograd through ``cumprod`` divides by its input, or takes a
    slow path when an entry is zero (identity blocks have zeros).

    The prefix products' gradient runs as a suffix recurrence over the ``K + 1`` factors; the
    entries' gradients (``C``'s and ``H``'s in one buffer) are summed into ``source`` with one
    ``index_add_`` (serial on the CPU: deterministic), and the angles' follow from their
    cosines' and sines' (:func:`_givens_indices`).
    """
    source, CH, P = saved
    gather, pos, _, _, sign, _ = indices
    count = params.shape[0]
    entries = 2 * count if givens else 4 * count
    if compiled:
        dsource, dangles = native.build_backward(dflat, saved, givens, count, gather, pos, sign)
        dparams = (dangles if givens else dsource.narrow(0, 0, entries).view(params.shape)) if want_params else None
        dscale = dsource.narrow(0, entries + 4, scale.shape[0]) if want_scale else None
        return dparams, dscale
    dV = dflat.index_select(0, pos).view(P.shape)
    if sign is not None:
        dV.mul_(sign)
    dCH = torch.empty_like(CH)
    S = dCH[:, 0]
    torch.mul(dV, CH[:, 1], out=S)
    torch.mul(dV, P, out=dCH[:, 1])
    # d/dC[l] of sum_t dP[t] prod_{j<=t} C[j] = P[l-1] * S[l], S[l] = dP[l] + C[l+1] S[l+1]
    columns, factors = S.unbind(1), CH[:, 0].unbind(1)
    for level in range(S.shape[1] - 2, -1, -1):
        columns[level].addcmul_(factors[level + 1], columns[level + 1])
    S.narrow(1, 1, S.shape[1] - 1).mul_(P.narrow(1, 0, P.shape[1] - 1))
    dsource = torch.zeros_like(source).index_add_(0, gather.view(-1), dCH.view(-1))
    dparams = dscale = None
    if want_params:
        if givens:
            # source starts with the cosines, then the sines: d/dθ = dsin cos - dcos sin
            cos, sin = source.narrow(0, 0, count), source.narrow(0, count, count)
            dparams = torch.addcmul(dsource.narrow(0, count, count) * cos, dsource.narrow(0, 0, count), sin, value=-1)
        else:
            dparams = dsource.narrow(0, 0, entries).view(params.shape)
        dparams = dparams.to(params.dtype)
    if want_scale:
        dscale = dsource.narrow(0, entries + 4, scale.shape[0]).to(scale.dtype)
    return dparams, dscale


class FactorValues(torch.autograd.Function):
    """``(blocks, Q)`` from the parameters (:func:`_build`), with a hand-written backward
    (:func:`_build_backward`).

    One node from the angles or entries (and the scale) to both factors instead of a dozen
    (the cosines, the concatenation, the two slices): at the width of a small model its
    fixed cost is a share of the layer's step. Under ``create_graph`` it differentiates
    :func:`_factor_values`. (:class:`DenseLinear` builds the factors inside its own node.)
    """

    @staticmethod
    def forward(ctx, params, scale, givens, dtype, indices, nb, b):
        flat, _, saved, compiled = _build(params, scale, givens, dtype, indices)
        ctx.save_for_backward(params, scale, *saved)
        ctx.setup = (givens, dtype, indices, nb, b, compiled)
        return _split(flat, nb, b)

    @staticmethod
    def backward(ctx, dblocks, dQ):
        params, scale, *saved = ctx.saved_tensors
        givens, dtype, indices, nb, b, compiled = ctx.setup
        size, source = indices[3], saved[0]
        if torch.is_grad_enabled():
            def output():
                return [t for t in _factor_values(params, scale, givens, dtype, indices, nb, b) if t is not None]

            zeros = _split(source.new_zeros(size), nb, b)
            grads = [g if g is not None else z for g, z in zip((dblocks, dQ), zeros) if z is not None]
            return _double_backward((params, scale), ctx.needs_input_grad[:2], output, grads) + (None,) * 5
        dflat = source.new_zeros(size)
        for view, grad in zip(_split(dflat, nb, b), (dblocks, dQ)):
            if grad is not None:
                view.copy_(grad)
        return _build_backward(dflat, saved, params, scale, givens, indices, *ctx.needs_input_grad[:2],
                               compiled) + (None,) * 5


def dense_factors(d: int, params: torch.Tensor, *, block: str, structure: str, scale: torch.Tensor | None,
                  block_width: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(blocks, Q)``: ``R = U @ blockdiag(blocks)`` in ``dtype``, differentiable.

    ``blocks`` is ``[nb, b, b]`` (stages ``1 .. m`` times the scale), ``Q`` is ``[nb, nb]``
    (stages ``m + 1 .. L`` on the roots ``0, b, 2b, ...``; ``None`` when ``nb == 1``). The
    last block is padded past ``d`` with the identity. One gather per factor kind, one
    ``cumprod`` and one scatter build both (:func:`_factor_indices`, :class:`FactorValues`).
    """
    m, b, nb = layout(d, block_width)
    givens = block == "givens"
    indices = _layout_indices(d, structure, b, scale is not None, givens, dtype, params.device)
    if torch.compiler.is_compiling():
        return _factor_values(params, scale, givens, dtype, indices, nb, b)
    return FactorValues.apply(params, scale, givens, dtype, indices, nb, b)


#: The largest intermediate :func:`_scratch` keeps between calls (larger ones are allocated afresh).
SCRATCH_LIMIT_BYTES = 256 << 20


class _ScratchBuffers(threading.local):
    """One grow-only buffer per role and dtype, per thread (:func:`_scratch`)."""

    def __init__(self):
        self.buffers: dict = {}


_SCRATCH = _ScratchBuffers()


def _scratch(role: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """A buffer of ``shape`` for an intermediate that never leaves the call asking for it.

    On a CPU a fresh buffer of a few MB costs more than the pass that fills it: its pages
    fault in again on first write (a fresh ``[1280, 1536]`` fp32 buffer, filled once: 2.0
    ms and about 58 minor faults on the 2-core machine of docs/benchmarks.md; the same fill
    into a reused buffer: 0.11 ms). So the intermediates that are neither returned nor
    saved for the backward (the rotated weight, ``x @ R`` before the frozen layer, the
    frozen layer's input gradient ``dy @ W``, the batched blocks' product) go into one
    buffer per role and dtype, kept per thread and grown as needed, up to
    :data:`SCRATCH_LIMIT_BYTES` each. Off the CPU (CUDA has a caching allocator) and past
    the limit: a fresh buffer. Whoever asks must be done with it before asking again for
    the same role.
    """
    n = math.prod(shape)
    # not for meta or fake tensors either: a kept buffer would be one of them
    if not native.in_memory(like) or n * like.element_size() > SCRATCH_LIMIT_BYTES:
        return like.new_empty(shape)
    key = (role, like.dtype)
    buf = _SCRATCH.buffers.get(key)
    if buf is None or buf.numel() < n:
        # made outside inference mode, so that later calls outside it may write into it
        with torch.inference_mode(False):
            buf = _SCRATCH.buffers[key] = torch.empty(n, dtype=like.dtype)
    return buf[:n].view(shape)


def release_buffers() -> None:
    """Drop the calling thread's reused buffers (:func:`_scratch`); later calls make new ones."""
    _SCRATCH.buffers.clear()


def _blocks(x: torch.Tensor, nb: int) -> torch.Tensor:
    """The view ``[nb, T, b]`` of rows ``[T, nb * b]``: block ``n`` of every row, in place."""
    return x.view(x.shape[0], nb, x.shape[1] // nb).transpose(0, 1)


#: Up to this many rows, :func:`_block_matmul` makes one batched BLAS call into a block-major
#: buffer and copies it back; past it, ATen's call per block on the rows' own layout wins
#: (measured with 8 to 1280 rows of d = 384 to 4096; docs/math.md §5).
SMALL_ROWS = 256


def _block_matmul(xb: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Rows times ``blockdiag(blocks)``, into fresh rows ``[T, nb * b]``.

    The rows come as their blocks ``xb``, ``[nb, T, b]``: :func:`_blocks` of rows ``[T, nb *
    b]``, or the same view of their transpose (a layout ``bmm`` reads in place too). Written
    into the rows' layout, the output is not contiguous, so ATen runs one BLAS call per
    block: a fixed cost per block that dominates for a few rows. There one batched call
    into a contiguous block-major buffer and a copy back are faster; for many rows the copy
    costs more.
    """
    nb, rows, b = xb.shape
    y = xb.new_empty(rows, nb * b)
    if rows <= SMALL_ROWS:
        _blocks(y, nb).copy_(torch.bmm(xb, blocks, out=_scratch("blocks", (nb, rows, b), xb)))
    else:
        torch.bmm(xb, blocks, out=_blocks(y, nb))
    return y


def _roots(x: torch.Tensor, Q: torch.Tensor, nb: int):
    """What ``U`` changes in rows ``x`` ``[T, nb * b]``: their roots ``[T, nb]`` and ``delta =
    (roots @ Q - roots)^T`` ``[nb, T]``, the change of each block's first entry."""
    roots = _blocks(x, nb)[:, :, 0].T.contiguous()
    # (Q - I)^T roots^T: one matmul into a contiguous [nb, T] (addmm would first copy roots^T
    # into its output, a transposing copy, and hand bmm a transposed delta, copied once more)
    return roots, torch.mm((Q - torch.eye(nb, dtype=Q.dtype, device=Q.device)).T, roots.T)


def _weight_rotated(weight: torch.Tensor, blocks: torch.Tensor, Q: torch.Tensor | None) -> torch.Tensor:
    """``W @ blockdiag(blocks)^T @ U^T`` for a weight ``[k, nb * b]``, as the transpose of a
    contiguous ``[nb * b, k]`` (what ``F.linear`` reads as fast as a contiguous weight).

    Its transpose ``U blockdiag(blocks) W^T`` is one batched call whose output, block
    ``j``'s ``b`` rows of ``k``, is contiguous; ``U`` then mixes the roots' rows (``Q`` times
    them), each a contiguous row. No call per block, whatever ``k``. The result lives in a
    reused buffer (:func:`_scratch`): it is for the caller's ``F.linear``, not to keep.
    """
    k, d = weight.shape
    nb = blocks.shape[0]
    z = _scratch("weight", (nb, d // nb, k), weight)
    torch.bmm(blocks, weight.view(k, nb, d // nb).permute(1, 2, 0), out=z)
    if Q is not None:
        z[:, 0, :] = Q @ z[:, 0, :]
    return z.view(d, k).T


def _rows_forward(x: torch.Tensor, blocks: torch.Tensor, Q: torch.Tensor | None):
    """``x @ U @ blockdiag(blocks)`` for rows ``[T, nb * b]``; returns ``(y, roots, delta)``.

    One ``bmm`` reads ``x`` in place and writes ``y`` in the rows' layout: no copies of the
    rows (each would be a pass, and on a CPU a fresh allocation costs about as much again
    in page faults). ``U`` changes only the roots, ``r = roots @ Q``, so ``y`` is then
    corrected by ``(r - roots)`` times each block's row 0 (``delta``, ``[nb, T]``).
    """
    nb = blocks.shape[0]
    y = _block_matmul(_blocks(x, nb), blocks)
    roots = delta = None
    if Q is not None:
        roots, delta = _roots(x, Q, nb)
        _blocks(y, nb).addcmul_(delta.unsqueeze(-1), blocks[:, :1, :])
    return y, roots, delta


def _rows_forward_t(x: torch.Tensor, blocks: torch.Tensor, Q: torch.Tensor | None):
    """:func:`_rows_forward` made as its transpose ``[nb * b, T]``, in a reused buffer
    (:func:`_scratch`); returns ``(yT, roots, delta)``.

    Block ``j`` of ``y^T`` is ``B_j^T x_j^T``: one batched call with a contiguous output,
    where ``y`` in the rows' layout takes a call per block; the roots' correction is one
    ``addcmul_`` on the same buffer. ``F.linear`` reads ``yT.T`` as fast as contiguous rows.
    """
    nb, b, _ = blocks.shape
    yT = _scratch("rows", (nb, b, x.shape[0]), x)
    torch.bmm(blocks.transpose(1, 2), _blocks(x, nb).transpose(1, 2), out=yT)
    roots = delta = None
    if Q is not None:
        roots, delta = _roots(x, Q, nb)
        yT.addcmul_(blocks[:, 0, :].unsqueeze(-1), delta.unsqueeze(1))
    return yT.view(nb * b, x.shape[0]), roots, delta


def _rows_transposed(x: torch.Tensor, blocks: torch.Tensor, Q: torch.Tensor | None):
    """``x @ blockdiag(blocks)^T @ U^T`` for rows ``[T, nb * b]``; returns ``(y, roots)``
    with ``roots`` the ``[T, nb]`` roots before ``Q^T``."""
    nb = blocks.shape[0]
    y = _block_matmul(_blocks(x, nb), blocks.transpose(1, 2))
    roots = None
    if Q is not None:
        roots = _blocks(y, nb)[:, :, 0].T.clone()
        _blocks(y, nb)[:, :, 0] = (roots @ Q.T).T
    return y, roots


def _rows_forward_backward(gb, x, roots, delta, blocks, Q, want_x: bool, want_blocks: bool, want_q: bool,
                           out=(None, None)):
    """Gradients of ``y = x @ U @ blockdiag(blocks)`` (:func:`_rows_forward`) for ``dy = g``,
    given as its blocks ``gb`` (``[nb, T, b]``, see :func:`_block_matmul`). ``out``: buffers
    for the blocks' and ``Q``'s gradients (else fresh ones)."""
    nb = blocks.shape[0]
    dx = dblocks = dQ = None
    if want_blocks:
        # x2 = x with its roots replaced: its blocks' row 0 held r = roots + delta
        dblocks = torch.bmm(_blocks(x, nb).transpose(1, 2), gb, out=out[0])
        if Q is not None:
            # into a fresh [nb, 1, b]: baddbmm_ on the strided row 0 would take a call per block
            dblocks[:, 0, :] += torch.bmm(delta.unsqueeze(1), gb).squeeze(1)
    if want_x:
        dx = _block_matmul(gb, blocks.transpose(1, 2))
    if Q is not None and (want_x or want_q):
        if want_x:
            dx_roots = _blocks(dx, nb)[:, :, 0].T
            # a copy also when the roots are all of dx (b = 1): mm below writes over them
            droots = dx_roots.clone(memory_format=torch.contiguous_format)
        else:
            droots = torch.bmm(gb, blocks[:, :1, :].transpose(1, 2)).squeeze(-1).T
        if want_q:
            dQ = torch.mm(roots.T, droots, out=out[1])
        if want_x:
            # a matmul into the strided roots would make a contiguous result and copy it: the
            # same copy, and more
            dx_roots.copy_(torch.mm(droots, Q.T))
    return dx, dblocks, dQ


def _rows_transposed_backward(g, x, roots, blocks, Q, want_x: bool, want_blocks: bool, want_q: bool):
    """Gradients of ``y = x @ blockdiag(blocks)^T @ U^T`` (:func:`_rows_transposed`) for ``dy = g``."""
    nb = blocks.shape[0]
    dx = dblocks = dQ = gdelta = None
    if Q is not None:
        # g1, the gradient before U^T, is g with its roots times Q: g + gdelta on the roots
        groots = _blocks(g, nb)[:, :, 0].T.contiguous()
        if want_q:
            dQ = groots.T @ roots
        gdelta = torch.addmm(groots.T, Q.T, groots.T, beta=-1)
    if want_blocks:
        dblocks = torch.bmm(_blocks(g, nb).transpose(1, 2), _blocks(x, nb))
        if gdelta is not None:
            dblocks[:, :1, :].baddbmm_(gdelta.unsqueeze(1), _blocks(x, nb))
    if want_x:
        dx = _block_matmul(_blocks(g, nb), blocks)
        if gdelta is not None:
            _blocks(dx, nb).addcmul_(gdelta.unsqueeze(-1), blocks[:, :1, :])
    return dx, dblocks, dQ


def _composite(x, blocks, Q, transpose):
    """The same map in differentiable ops, for rows ``[T, nb * b]``: what the compiler traces
    and what the double backward differentiates."""
    nb, b, _ = blocks.shape
    xv = x.view(x.shape[0], nb, b)
    if not transpose:
        if Q is not None:
            xv = torch.cat(((xv[:, :, 0] @ Q).unsqueeze(-1), xv[:, :, 1:]), -1)
        y = torch.einsum("tnj,njc->tnc", xv, blocks)
    else:
        y = torch.einsum("tnc,njc->tnj", xv, blocks)
        if Q is not None:
            y = torch.cat(((y[:, :, 0] @ Q.T).unsqueeze(-1), y[:, :, 1:]), -1)
    return y.reshape(x.shape)


def _autocast_on(device_type: str) -> bool:
    """Whether autocast is on for ``device_type``: never for a device it does not know (the meta
    device, on which ``torch.is_autocast_enabled`` raises)."""
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def _without_autocast(device_type: str):
    """Autocast off for ``device_type``: its context only where it is on (entering one costs
    a few microseconds, a share of a small layer's step)."""
    return torch.autocast(device_type, enabled=False) if _autocast_on(device_type) else nullcontext()


def _double_backward(inputs, wants, output, grad):
    """The gradients of a Function's inputs by differentiating ``output()`` again (``create_graph``)."""
    with torch.enable_grad():
        grads = iter(torch.autograd.grad(output(), [t for t, want in zip(inputs, wants) if want], grad,
                                         create_graph=True))
    return tuple(next(grads) if want else None for want in wants)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` with unit stride along the features (``bmm`` needs it; a copy only otherwise)."""
    return x if x.stride(-1) == 1 and x.stride(0) >= x.shape[-1] else x.contiguous()


def _native_rotation_backward(x, g, blocks, Q, transpose: bool, want_x: bool, want_blocks: bool, want_q: bool):
    """:class:`DenseRotation`'s gradients by the compiled kernels (:mod:`qgoft_kernels.native`).

    For ``y = x @ R``, one pass gives ``dx = g @ R^T`` and the factors' gradients. For ``y = x
    @ R^T``, ``dx = g @ R`` is the forward pass over ``g``; and since ``<x R^T, g> = <g R,
    x>``, the factors' gradients are those of ``g @ R`` against ``x``: the same backward pass
    with the two operands' roles swapped.
    """
    nb, b, _ = blocks.shape
    want_q = want_q and Q is not None
    dblocks = blocks.new_empty(blocks.shape) if want_blocks else None
    dQ = Q.new_empty(Q.shape) if want_q else None
    scratch = _scratch("partials", (native.scratch_size(nb, b, Q is not None),), x)
    if not transpose:
        dx = x.new_empty(x.shape) if want_x else None
        native.backward(x, g, blocks, Q, dx, dblocks, dQ, scratch)
        return dx, dblocks, dQ
    dx = native.rotate(g, blocks, Q, False, g.new_empty(g.shape)) if want_x else None
    if want_blocks or want_q:
        native.backward(g, x, blocks, Q, None, dblocks, dQ, scratch)
    return dx, dblocks, dQ


class DenseRotation(torch.autograd.Function):
    """``x @ U @ blockdiag(blocks)`` (or its transpose) for rows ``x`` of shape ``[T, nb * b]``.

    Where the compiled kernels take the rows (:func:`qgoft_kernels.native.applies`), the
    forward is one pass of them and the backward one or two (:func:`_native_rotation_backward`),
    saving only ``x`` (no copy of it). Otherwise ATen's ops: ``x`` and ``[T, nb]`` roots are
    saved, and the backward is one ``bmm`` for the blocks' gradient, one for ``dx`` and small
    matmuls for the roots. Either way only the gradients asked for are computed. Under
    ``create_graph`` it differentiates :func:`_composite` instead. Inputs are assumed valid
    (``x`` in the factors' dtype).
    """

    @staticmethod
    def forward(ctx, x, blocks, Q, transpose):
        x = _rows(x)
        nb, b, _ = blocks.shape
        ctx.compiled = native.applies(x, (nb, b)) and blocks.dtype == x.dtype
        roots = delta = None
        if ctx.compiled:
            y = native.rotate(x, blocks, Q, transpose, x.new_empty(x.shape))
        elif transpose:
            y, roots = _rows_transposed(x, blocks, Q)
        else:
            y, roots, delta = _rows_forward(x, blocks, Q)
        ctx.save_for_backward(x, blocks, Q, roots, delta)
        ctx.transpose = transpose
        return y

    @staticmethod
    def backward(ctx, dy):
        x, blocks, Q, roots, delta = ctx.saved_tensors
        wants = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():
            return _double_backward((x, blocks, Q), wants, lambda: _composite(x, blocks, Q, ctx.transpose),
                                    dy) + (None,)
        with _without_autocast(dy.device.type):
            if ctx.compiled:
                return _native_rotation_backward(x, _rows(dy), blocks, Q, ctx.transpose, *wants) + (None,)
            if ctx.transpose:
                return _rows_transposed_backward(_rows(dy), x, roots, blocks, Q, *wants) + (None,)
            return _rows_forward_backward(_blocks(_rows(dy), blocks.shape[0]), x, roots, delta, blocks, Q,
                                          *wants) + (None,)


#: :class:`DenseLinear` rotates the weight's ``k`` rows rather than the ``T`` rows of ``x`` while
#: ``k`` is below this many times ``T``: a row of ``x`` costs more than a row of ``W`` to rotate
#: (per-block calls into a strided output, and the roots gathered and scattered; ``W R^T`` is
#: one batched call into a contiguous buffer): 1.3-1.7x at d = 256 to 1536 and 1280 rows, about
#: the same at d = 768 and 1024 with k = 4d, 1.6x at d = 4096 (docs/math.md §5).
WEIGHT_ROWS_PER_ROW = 1.5

#: The same with the compiled kernels (:mod:`qgoft_kernels.native`), which rotate a row of ``x``
#: and a row of ``W`` by the same pass: at d = 1536, 1.2 µs per row of ``x`` (1280 rows) and 1.1
#: per row of ``W`` (1536 rows), caches cleared first (docs/math.md §6); so the operand with fewer
#: rows is rotated.
NATIVE_WEIGHT_ROWS_PER_ROW = 1.0


#: From this many rows, :class:`DenseLinear` makes ``x @ R`` as its transpose when it rotates ``x``
#: (:func:`_rows_forward_t`; docs/math.md §5): one batched call where the rows' layout takes a
#: call per block. ``dy @ W`` in the backward stays in the rows' layout for any number of rows
#: (its transpose ``W^T dy^T`` is the slower matmul, and what it saved in the batched calls did
#: not make up for it on an Intel Xeon; docs/math.md §5).
TRANSPOSED_ROWS = 256


def rotates_weight(k: int, rows: int, compiled: bool = False) -> bool:
    """Whether :class:`DenseLinear` rotates the ``k`` rows of the weight (else the ``rows`` of
    ``x``), with the compiled kernels or with ATen's ops."""
    return k < (NATIVE_WEIGHT_ROWS_PER_ROW if compiled else WEIGHT_ROWS_PER_ROW) * rows


class DenseLinear(torch.autograd.Function):
    """``F.linear(x @ R, weight, bias)`` for rows ``x`` ``[T, nb * b]``, with ``R``'s factors
    built from the parameters inside the same node.

    The factors come from :func:`_build` (``params``: angles or blocks, and ``scale``). The
    forward rotates the cheaper operand (:func:`rotates_weight`): the ``T`` rows of ``x``,
    or the ``k`` rows of ``weight`` (``W R^T``, then ``F.linear(x, W R^T, bias)``: no ``[T,
    d]`` intermediate). Neither rotated operand is kept (:func:`_scratch`). The backward is
    the same either way: ``g = dy @ W`` (the frozen layer's own input gradient, in a reused
    buffer), then ``dx = g @ R^T`` and the factors' gradients from ``x`` and ``g``, as
    :class:`DenseRotation` does, written straight into the buffer that
    :func:`_build_backward` turns into the parameters' gradients. One node from the
    parameters to the output: at the width of a small model the fixed cost of a node is a
    share of the step. Gradients of ``weight`` and ``bias`` are computed when asked.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, params, scale, givens, indices, nb, b):
        x = _rows(x)
        compiled = native.applies(x, (nb, b))
        # the compiled kernels read the transposed factors too: built beside the factors
        flat, flat_t, saved, built = _build(params, scale, givens, x.dtype, indices, transposed=compiled)
        blocks, Q = _split(flat, nb, b)
        transposed = _split(flat_t, nb, b) if flat_t is not None else None
        roots = delta = None
        if rotates_weight(weight.shape[0], x.shape[0], compiled):
            if compiled:
                # W R^T = W blockdiag(B^T) U^T, rows of W in one pass
                rotated = native.rotate(_rows(weight), blocks, Q, True, _scratch("weight", tuple(weight.shape), weight),
                                        transposed)
            else:
                rotated = _weight_rotated(_rows(weight), blocks, Q)
            out = F.linear(x, rotated, bias)
        elif compiled:
            out = F.linear(native.rotate(x, blocks, Q, False, _scratch("rows", tuple(x.shape), x)), weight, bias)
        elif x.shape[0] >= TRANSPOSED_ROWS:
            # x @ R is not kept: the backward starts again from x
            yT, roots, delta = _rows_forward_t(x, blocks, Q)
            out = F.linear(yT.T, weight, bias)
        else:
            y, roots, delta = _rows_forward(x, blocks, Q)
            out = F.linear(y, weight, bias)
        blocks_t, Q_t = transposed or (None, None)
        ctx.save_for_backward(x, weight, bias, params, scale, blocks, Q, blocks_t, Q_t, roots, delta, *saved)
        ctx.setup = (givens, indices, nb, b, built)
        return out

    @staticmethod
    def backward(ctx, dout):
        x, weight, bias, params, scale, blocks, Q, blocks_t, Q_t, roots, delta, *saved = ctx.saved_tensors
        givens, indices, nb, b, built = ctx.setup
        wants = ctx.needs_input_grad[:5]
        if torch.is_grad_enabled():
            def output():
                factors = _factor_values(params, scale, givens, x.dtype, indices, nb, b)
                return F.linear(_composite(x, *factors, False), weight, bias)
            return _double_backward((x, weight, bias, params, scale), wants, output, dout) + (None,) * 4
        want_x, want_w, want_bias, want_params, want_scale = wants
        want_factors = want_params or want_scale
        with _without_autocast(dout.device.type):
            dout = _rows(dout)
            dx = dparams = dscale = dw = dbias = None
            if want_x or want_factors:
                # g = dout @ W, in a reused buffer
                g = torch.mm(dout, weight, out=_scratch("grad", (dout.shape[0], weight.shape[1]), x))
                dflat, out = None, (None, None)
                if want_factors:
                    # the factors' gradients go straight into the buffer _build_backward reads
                    _, _, used, size, _, _ = indices
                    dflat = x.new_empty(size)
                    dflat[used:].zero_()
                    out = _split(dflat, nb, b)
                if blocks_t is not None:
                    dx = x.new_empty(x.shape) if want_x else None
                    partials = _scratch("partials", (native.scratch_size(nb, b, Q is not None),), x)
                    native.backward(x, g, blocks, Q, dx, *out, partials, (blocks_t, Q_t))
                else:
                    if Q is not None and roots is None and want_factors:
                        roots, delta = _roots(x, Q, nb)
                    dx, _, _ = _rows_forward_backward(_blocks(g, nb), x, roots, delta, blocks, Q, want_x,
                                                      want_factors, want_factors, out)
                if want_factors:
                    dparams, dscale = _build_backward(dflat, saved, params, scale, givens, indices, want_params,
                                                      want_scale, built)
            if want_w:
                dw = dout.T @ _rows_forward(x, blocks, Q)[0]
            if want_bias:
                dbias = dout.sum(0)
        return dx, dw, dbias, dparams, dscale, None, None, None, None


def _padded(x: torch.Tensor, n: int) -> torch.Tensor:
    return F.pad(x, (0, n - x.shape[-1])) if n > x.shape[-1] else x


def rotate_dense(x: torch.Tensor, params: torch.Tensor, *, block: str = "givens", structure: str = "tree",
                 scale: torch.Tensor | None = None, transpose: bool = False,
                 block_width: int = DEFAULT_BLOCK) -> torch.Tensor:
    """``x @ R`` (or ``x @ R^T``) through the dense factors; float32 compute (float64 for float64 ``x``).

    Same contract as :func:`qgoft_kernels.sweeps.rotate_sweeps`; ``block_width`` is the
    block width ``b`` (a power of two; ``>= 2**L`` applies the dense ``R`` in one matmul).
    Inputs are assumed valid; :func:`qgoft_kernels.givens_rotate` checks them.
    """
    d = x.shape[-1]
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    # the matmuls compute in `compute`, also under autocast (which would run them in bf16)
    with _without_autocast(x.device.type):
        blocks, Q = dense_factors(d, params, block=block, structure=structure, scale=scale,
                                  block_width=block_width, dtype=compute)
        rows = _padded(x.reshape(-1, d).to(compute), blocks.shape[0] * blocks.shape[1])
        if torch.compiler.is_compiling():
            y = _composite(rows, blocks, Q, transpose)
        else:
            y = DenseRotation.apply(rows, blocks, Q, transpose)
    return y[:, :d].reshape(x.shape).to(x.dtype).contiguous()


def linear_dense(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, params: torch.Tensor, *,
                 block: str, structure: str, scale: torch.Tensor | None,
                 block_width: int = DEFAULT_BLOCK) -> torch.Tensor:
    """``F.linear(x @ R, weight, bias)`` in one :class:`DenseLinear` (inputs assumed valid).

    For ``x`` and ``weight`` of one dtype, float32 or float64, with ``d`` a multiple of the
    block width (:func:`fused_linear_applies`).
    """
    d = x.shape[-1]
    _, b, nb = layout(d, block_width)
    indices = _layout_indices(d, structure, b, scale is not None, block == "givens", x.dtype, params.device)
    # rows as they are when x is 2-D: a reshape would add two autograd nodes (a share of a
    # small layer's step)
    rows = x if x.dim() == 2 else x.reshape(-1, d)
    out = DenseLinear.apply(rows, weight, bias, params, scale, block == "givens", indices, nb, b)
    return out if x.dim() == 2 else out.reshape(*x.shape[:-1], weight.shape[0])


def fused_linear_applies(x: torch.Tensor, weight: torch.Tensor, block_width: int) -> bool:
    """Whether :func:`linear_dense` takes this call: one float32/float64 dtype, no autocast, no
    compiler, and ``d`` a multiple of the block width (else the rows would be padded)."""
    d = x.shape[-1]
    _, b, nb = layout(d, block_width)
    return (x.dtype == weight.dtype and x.dtype in (torch.float32, torch.float64) and nb * b == d
            and not _autocast_on(x.device.type) and not torch.compiler.is_compiling())
