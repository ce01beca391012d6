"""Mixed batches: every row of one batch rotated by the adapter it names, in one launch.

Many fine-tunes of one base model differ only in their rotations (``O(d)`` numbers per
layer), so one batch can serve them all: stack the adapters' parameters (``[A, P]`` angles
or ``[A, P, 2, 2]`` blocks, ``[A, d]`` scales) and give each row the index of its adapter,
``-1`` for none (that row passes through bit for bit). :class:`MixedBatch` sorts the rows by
adapter once per batch and cuts them into tiles of one adapter each; every layer of a
forward reuses it. The Triton kernel (``kernels.forward.givens_fwd_mixed``) then runs one
wave of persistent programs per chunk, each walking a contiguous share of the tiles and
loading an adapter's coefficients once per run of that adapter's tiles; the PyTorch path
rotates each adapter's rows with the ordinary path. docs/api.md, "Mixed batches";
docs/tuning.md, "Mixed batches", for the kernel's design and its static model.

Only ``x @ R`` is offered (the forward of an adapted layer). Gradients are exact on both
paths (the Triton path's backward runs the ordinary backward once per adapter present); the
point of a mixed batch is inference.
"""
from __future__ import annotations

import functools
import weakref

import torch

from . import ops
from .checks import check_float, check_params, describe, rotation_shape

#: Rows per tile of a mixed batch on a GPU (fewer where an adapter has fewer): the unit the
#: kernel's programs share out; a program loads an adapter's coefficients once per run of tiles
TILE_ROWS = 32
#: Block width of the dense factors a mixed batch keeps per adapter on the CPU: ``d (b + d / b**2)``
#: values per adapter and layer, the fewest at ``b = 16`` for the usual widths, where the kernel
#: was also fastest (4,096 rows in runs of 64, 64 adapters, d = 768 and 1024: b = 8, 16, 32, 64
#: took 4.9, 0.7, 1.0, 2.1 ms and 5.4, 0.9, 1.4, 3.3 ms; docs/benchmarks.md, "Serving")
SERVING_BLOCK = 16
#: Rows per tile under the interpreter: small and odd, so that tests cross tile and block edges
INTERPRETER_TILE_ROWS = 3

_INDEX_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


class MixedBatch:
    """Which adapter each row of a batch uses, grouped once for every layer of a forward.

    Args:
        adapter_index: integer tensor, one adapter per row (``-1``: no adapter, the row passes
            through unchanged). Its shape is the rows' shape: ``x.shape[:-1]`` of the
            activations it will be used with, or ``[batch]`` for ``[batch, ..., d]``
            activations (one adapter per sample, as PEFT's ``adapter_names``).
        n_adapters: how many adapters the stacked parameters hold; every index must be below it.
        device: where the activations are, when the index is not there: an index on the CPU
            (built from adapter names, say) is grouped there, without any device
            synchronisation, and only the grouping is copied over.

    Building it reads the index once on the host (one device synchronisation per batch, not
    per layer, none for an index on the CPU). Passing the same ``MixedBatch`` to every layer
    of a forward is what makes a mixed batch cheap; :func:`qgoft_kernels.givens_rotate` also
    takes the raw index and builds one itself.
    """

    def __init__(self, adapter_index: torch.Tensor, n_adapters: int, device: torch.device | str | None = None):
        if not isinstance(adapter_index, torch.Tensor):
            raise TypeError(f"adapter_index must be an integer torch.Tensor, got {type(adapter_index).__name__}")
        if adapter_index.dtype not in _INDEX_DTYPES:
            raise TypeError(f"adapter_index must have an integer dtype (int64, int32, ...; -1 for no adapter), "
                            f"got {adapter_index.dtype}")
        if isinstance(n_adapters, bool) or not isinstance(n_adapters, int) or n_adapters < 1:
            raise ValueError(f"n_adapters must be an int >= 1, got {n_adapters!r}")
        index = adapter_index.reshape(-1).to(torch.int64)
        if index.numel():
            low, high = (int(v) for v in torch.aminmax(index))
            if low < -1 or high >= n_adapters:
                bad = low if low < -1 else high
                raise ValueError(f"adapter_index holds {bad}; each entry must be -1 (no adapter) or an adapter "
                                 f"in 0..{n_adapters - 1} (n_adapters={n_adapters})")
        self.shape = tuple(adapter_index.shape)
        self.n_adapters = n_adapters
        # normalised ("cuda" -> "cuda:0"), so that it compares equal to the activations' device
        self.device = adapter_index.device if device is None else torch.empty(0, device=device).device
        self.index = index
        # rows grouped by adapter (stable: ascending rows inside a group); -1 first
        self.order = torch.argsort(index, stable=True).to(self.device)
        counts = torch.bincount(index + 1, minlength=n_adapters + 1).tolist()
        self.groups: list[tuple[int, int, int]] = []   # (adapter, first position in order, rows)
        first = 0
        for adapter, rows in enumerate(counts, start=-1):
            if rows:
                self.groups.append((adapter, first, rows))
            first += rows
        self._tiles: dict[int, torch.Tensor] = {}

    def __repr__(self) -> str:
        used = sum(1 for a, _, _ in self.groups if a >= 0)
        return (f"MixedBatch(rows={self.index.numel()}, n_adapters={self.n_adapters}, adapters used={used}, "
                f"base rows={sum(n for a, _, n in self.groups if a < 0)})")

    def adapters(self) -> list[int]:
        """The adapters some row uses, ascending (``-1`` left out)."""
        return [a for a, _, _ in self.groups if a >= 0]

    def rows_of(self, adapter: int) -> torch.Tensor:
        """The rows (flat indices, ascending) that use ``adapter``."""
        for a, first, rows in self.groups:
            if a == adapter:
                return self.order[first:first + rows]
        return self.order[:0]

    def runs(self) -> torch.Tensor:
        """``[n, 3]`` int64 on the CPU: ``(first row, rows, adapter)`` per run of consecutive rows
        of one adapter, in the rows' own order (the CPU kernel's work list)."""
        if "_runs" not in self.__dict__:
            values, counts = torch.unique_consecutive(self.index.cpu(), return_counts=True)
            starts = torch.cumsum(counts, 0) - counts
            self._runs = torch.stack((starts, counts, values), 1).contiguous()
        return self._runs

    def kernel_order(self) -> torch.Tensor:
        """``order`` as the kernel reads it (int32), made once."""
        if "_order32" not in self.__dict__:
            self._order32 = self.order.to(torch.int32)
        return self._order32

    def tiles(self, tile_rows: int) -> torch.Tensor:
        """``[T, 3]`` int32 on the batch's device: ``(first position in order, rows, adapter)`` per
        tile of at most ``tile_rows`` rows of one adapter (the Triton kernel's grid)."""
        if tile_rows not in self._tiles:
            table = [(first + start, min(tile_rows, rows - start), adapter)
                     for adapter, first, rows in self.groups for start in range(0, rows, tile_rows)]
            self._tiles[tile_rows] = torch.tensor(table, dtype=torch.int32).reshape(-1, 3).to(self.device)
        return self._tiles[tile_rows]

    def check_rows(self, x: torch.Tensor) -> int:
        """How many rows of ``x`` (``[..., d]``) each index entry stands for; raise unless the
        index has ``x``'s row shape or is one entry per leading sample."""
        rows_shape = tuple(x.shape[:-1])
        if self.shape == rows_shape:
            return 1
        if x.dim() > 2 and self.shape == rows_shape[:1]:
            return x[0, ..., 0].numel()
        raise ValueError(f"adapter_index must have x's row shape {rows_shape} (one adapter per row) or, for x "
                         f"with more than two dimensions, ({rows_shape[0] if rows_shape else 0},) (one per sample); "
                         f"got shape {self.shape} for x of {describe(x)}")

    def per_row(self, repeat: int) -> "MixedBatch":
        """This batch with each entry repeated for ``repeat`` consecutive rows (one per sample ->
        one per row); cached, so every layer gets the same expanded batch."""
        if repeat == 1:
            return self
        cache = self.__dict__.setdefault("_per_row", {})
        if repeat not in cache:
            cache[repeat] = MixedBatch(self.index.repeat_interleave(repeat), self.n_adapters, self.device)
        return cache[repeat]


def as_batch(adapter_index, n_adapters: int, x: torch.Tensor) -> MixedBatch:
    """``adapter_index`` (a tensor or a :class:`MixedBatch`) as a per-row batch for ``x``."""
    batch = adapter_index if isinstance(adapter_index, MixedBatch) else MixedBatch(adapter_index, n_adapters)
    if batch.n_adapters != n_adapters:
        raise ValueError(f"adapter_index was built for n_adapters={batch.n_adapters}, but params stack "
                         f"{n_adapters} adapters")
    if batch.device != x.device:
        raise ValueError(f"adapter_index and x must be on one device: adapter_index is on {batch.device}, "
                         f"x on {x.device}")
    return batch.per_row(batch.check_rows(x))


def check_stacked(d: int, params, block: str, structure: str, scale) -> int:
    """Raise a clear error unless ``params`` (``[A, ...]``) and ``scale`` (``[A, d]``) stack ``A``
    adapters for ``d`` features; return ``A``."""
    check_float("params", params)
    one = rotation_shape(d, block, structure)
    if params.dim() != len(one) + 1 or tuple(params.shape[1:]) != one or params.shape[0] < 1:
        raise ValueError(f"with adapter_index, params must stack the adapters along a first dimension: shape "
                         f"(A, {', '.join(map(str, one))}) for A >= 1 adapters, block={block!r}, "
                         f"structure={structure!r} and d={d} (x's last dimension); got {describe(params)}")
    n = params.shape[0]
    if scale is not None:
        check_float("scale", scale)
        if tuple(scale.shape) != (n, d):
            raise ValueError(f"with adapter_index, scale must stack one [d] scale per adapter: shape ({n}, {d}) "
                             f"for {n} adapters and d={d}, got {describe(scale)}")
    check_params(d, params[0], block, structure, None if scale is None else scale[0])
    return n


def rotate_mixed_torch(x: torch.Tensor, params: torch.Tensor, batch: MixedBatch, *, block: str, structure: str,
                       scale: torch.Tensor | None) -> torch.Tensor:
    """The PyTorch path. Where autograd records nothing and the compiled CPU kernels are built
    (inference on the CPU), one kernel call runs every run of rows with its adapter's dense
    factors, made once per stack and kept (:func:`serving_factors`). Otherwise each adapter's
    rows go through the ordinary path (its formulation chosen for that many rows), the rows
    of adapter ``-1`` as they are; differentiable."""
    from .torch_path import rotate_torch

    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, params, scale))):
        fast = _rotate_runs(x, params, batch, block, structure, scale)
        if fast is not None:
            return fast

    rows = x.reshape(-1, x.shape[-1])
    pieces = []
    for adapter, first, n in batch.groups:
        taken = rows.index_select(0, batch.order[first:first + n])
        if adapter >= 0:
            taken = rotate_torch(taken, params[adapter], block=block, structure=structure,
                                 scale=None if scale is None else scale[adapter], transpose=False)
        pieces.append(taken)
    by_adapter = torch.cat(pieces) if pieces else rows
    out = torch.empty_like(by_adapter).index_copy(0, batch.order, by_adapter) if pieces else rows.clone()
    return out.view(x.shape)


class MixedRotationFunction(torch.autograd.Function):
    """The Triton path of a mixed batch: one forward launch; the backward runs the ordinary
    backward kernels once per adapter present (exact; training through a mixed batch is not
    what it is for). Inputs are assumed valid."""

    @staticmethod
    def forward(ctx, x, params, scale, batch: MixedBatch, block: str, structure: str):
        rows = ops._as_rows(x)
        n = tile_rows(x.device)
        y = ops._kernels().givens_fwd_mixed(rows, params.contiguous(), None if scale is None else scale.contiguous(),
                                            batch.kernel_order(), batch.tiles(n), quasi=block == "quasi", tile_rows=n)
        ctx.save_for_backward(x, params, scale)
        ctx.batch, ctx.block, ctx.structure = batch, block, structure
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x, params, scale = ctx.saved_tensors
        batch = ctx.batch
        need_dx, need_dparams, need_dscale = ctx.needs_input_grad[:3]
        rows, grads = ops._as_rows(x), ops._as_rows(dy)
        dx = torch.empty_like(rows) if need_dx else None
        dparams = torch.zeros_like(params) if need_dparams else None
        dscale = torch.zeros_like(scale) if need_dscale else None
        for adapter, first, n in batch.groups:
            where = batch.order[first:first + n]
            if adapter < 0:
                if dx is not None:
                    dx.index_copy_(0, where, grads.index_select(0, where))
                continue
            g_x, g_p, g_s = ops.launch_backward(
                rows.index_select(0, where), grads.index_select(0, where), params[adapter],
                None if scale is None else scale[adapter], ctx.block, ctx.structure, False,
                need_dx, need_dparams, need_dscale)
            if dx is not None:
                dx.index_copy_(0, where, g_x)
            if dparams is not None:
                dparams[adapter] = g_p
            if dscale is not None:
                dscale[adapter] = g_s
        return (None if dx is None else dx.view(x.shape), dparams, dscale, None, None, None)


def tile_rows(device: torch.device) -> int:
    from .planning import as_gpu
    return TILE_ROWS if as_gpu(device) else INTERPRETER_TILE_ROWS


# ------------------------------------------------------------------------------------------
# adapters by name (the PEFT layer and the inject route)

#: Adapter names that mean "no adapter" for a row: PEFT's ``"__base__"``
BASE = "__base__"


@functools.lru_cache(maxsize=64)
def _names_batch(adapter_names: tuple, names: tuple, device: torch.device) -> MixedBatch:
    position = {n: i for i, n in enumerate(names)}
    index = torch.tensor([position.get(n, -1) for n in adapter_names], dtype=torch.int64)
    return MixedBatch(index, len(names), device)


def names_to_batch(adapter_names, names, device) -> MixedBatch:
    """The batch whose sample ``i`` uses adapter ``names.index(adapter_names[i])`` (``-1`` where
    ``names`` lacks it: ``"__base__"``, or an adapter this layer does not have). Built on the
    CPU and cached, so every layer with the same adapters, and every step of a ``generate``,
    shares one."""
    return _names_batch(tuple(adapter_names), tuple(names), torch.empty(0, device=device).device)


def stacked_adapters(owner, names, rotations, scales) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The rotations (and scales) of ``names`` stacked ``[A, ...]`` for a mixed batch.

    Adapters without a scale get ones where others have one (an exact no-op). The stack is
    kept on ``owner`` and made again only when a tensor changed (its storage or its in-place
    version counter), unless autograd would record it: then it is made for this call.
    """
    with_scale = any(s is not None for s in scales)

    def stack():
        params = torch.stack([r.to(rotations[0].dtype) for r in rotations])
        if not with_scale:
            return params, None
        ones = next(s for s in scales if s is not None)
        return params, torch.stack([s.to(ones.dtype) if s is not None else torch.ones_like(ones) for s in scales])

    tensors = [t for t in (*rotations, *scales) if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return stack()
    key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors), tuple(s is None for s in scales)
    cache = owner.__dict__.setdefault("_qgoft_stacks", {})
    hit = cache.get(tuple(names))
    if hit is None or hit[0] != key:
        with torch.no_grad():
            cache[tuple(names)] = (key, *stack())
    return cache[tuple(names)][1:]


# ------------------------------------------------------------------------------------------
# inference on the CPU: one kernel call over the runs, with dense factors kept per stack

#: ``id(params) -> (weak reference to params, key, factors)``; an entry leaves with its tensor
_FACTORS: dict[int, tuple] = {}


def serving_factors(params: torch.Tensor, scale: torch.Tensor | None, *, block: str, structure: str, d: int,
                    dtype: torch.dtype, block_width: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Every stacked adapter's dense factors (``qgoft_kernels.dense``): ``blocks`` ``[A, nb, b,
    b]`` and ``Q`` ``[A, nb, nb]`` (``None`` with one block), made once and kept while ``params``
    lives and neither it nor ``scale`` changes (their in-place version counters)."""
    from .dense import dense_factors

    key = (params._version, None if scale is None else (id(scale), scale._version), block, structure, d, dtype,
           block_width)
    hit = _FACTORS.get(id(params))
    if hit is not None and hit[0]() is params and hit[1] == key:
        return hit[2]
    with torch.no_grad():
        built = [dense_factors(d, params[a], block=block, structure=structure,
                               scale=None if scale is None else scale[a], block_width=block_width, dtype=dtype)
                 for a in range(params.shape[0])]
        blocks = torch.stack([b for b, _ in built]).contiguous()
        Q = None if built[0][1] is None else torch.stack([q for _, q in built]).contiguous()
    ident = id(params)
    _FACTORS[ident] = (weakref.ref(params, lambda _: _FACTORS.pop(ident, None)), key, (blocks, Q))
    return blocks, Q


def _rotate_runs(x, params, batch: MixedBatch, block: str, structure: str, scale) -> torch.Tensor | None:
    """:func:`rotate_mixed_torch` by the compiled CPU kernel, or ``None`` where it does not apply."""
    from . import native
    from .dense import _padded, layout

    d = x.shape[-1]
    if x.device.type != "cpu" or native.library() is None:
        return None
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    _, b, nb = layout(d, SERVING_BLOCK)
    rows = _padded(x.reshape(-1, d).to(compute), nb * b).contiguous()
    if not native.applies(rows, (nb, b)):
        return None
    blocks, Q = serving_factors(params, scale, block=block, structure=structure, d=d, dtype=compute,
                                block_width=b)
    out = torch.empty_like(rows)
    native.rotate_runs(rows, batch.runs(), d, blocks, Q, out)
    return out[:, :d].to(x.dtype).reshape(x.shape)


def kept_bytes(owner) -> int:
    """Bytes a layer keeps for serving mixed batches: its stacked parameters and, on the CPU,
    their dense factors (:func:`stacked_adapters`, :func:`serving_factors`)."""
    total = 0
    for _, params, scale in owner.__dict__.get("_qgoft_stacks", {}).values():
        for t in (params, scale):
            if t is not None:
                total += t.numel() * t.element_size()
        hit = _FACTORS.get(id(params))
        if hit is not None and hit[0]() is params:
            total += sum(t.numel() * t.element_size() for t in hit[2] if t is not None)
    return total
