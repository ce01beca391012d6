"""``givens_rotate``: input checks, backend dispatch and the thin autograd Function."""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from . import mixed, ops
from .checks import NO_TRITON, check_float, check_params, describe, interpreting, triton_available
from .mixed import MixedBatch, MixedRotationFunction, as_batch, check_stacked, rotate_mixed_torch
from .planning import as_gpu
from .torch_path import linear_torch, rotate_torch

BACKENDS = ("auto", "triton", "torch")
#: Largest ``d`` the Triton kernels take. Rows longer than a chunk are split (docs/math.md §4);
#: this bound is what the compile report and the GPU tier cover.
MAX_TRITON_DIM = 32768


def _check_inputs(x, params, block, structure, scale, transpose, backend, mixed: bool = False) -> str:
    """Validate everything; return the backend to use (``"triton"`` or ``"torch"``).

    ``mixed``: ``params`` and ``scale`` stack several adapters (:mod:`qgoft_kernels.mixed`)."""
    check_float("x", x)
    if x.dim() < 1:
        raise ValueError(f"x must have at least one dimension (the features), got {describe(x)}")
    d = x.shape[-1]
    if d < 1:
        raise ValueError(f"x's last dimension (d) must be >= 1, got {describe(x)}")
    if mixed:
        check_stacked(d, params, block, structure, scale)
        if transpose is not False:
            raise ValueError("with adapter_index, only x @ R is offered (transpose=False): a mixed batch is "
                             "the forward of adapted layers")
    else:
        check_params(d, params, block, structure, scale)
    if params.device != x.device:
        raise ValueError(f"params and x must be on one device: params is on {params.device}, x on {x.device}")
    if not isinstance(transpose, bool):
        raise TypeError(f"transpose must be a bool, got {type(transpose).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    gpu = as_gpu(x.device)
    if backend == "torch" or (backend == "auto" and not gpu and not interpreting()):
        return "torch"
    if not triton_available():
        if backend == "triton":
            raise ImportError(f"backend='triton': {NO_TRITON}")
        if gpu:
            warnings.warn("triton is not installed: qgoft_kernels runs the PyTorch path on CUDA tensors (correct, "
                          "slower than the fused kernels); `pip install triton` on Linux for them", stacklevel=3)
        return "torch"
    if not gpu and not interpreting():
        raise ValueError(f"backend='triton' needs a CUDA tensor or TRITON_INTERPRET=1, got x on {x.device}")
    if d > MAX_TRITON_DIM:
        if backend == "auto":
            return "torch"
        raise ValueError(f"backend='triton' supports d <= {MAX_TRITON_DIM}, got d={d}; use backend='torch'")
    return "triton"


class GivensRotationFunction(torch.autograd.Function):
    """The Triton path as a ``torch.autograd.Function``: one kernel launch each way.

    Saves only ``x`` and the parameters; the backward recomputes every stage on chip and
    computes only the gradients autograd asks for. It is an entry point for code that wants
    a plain ``Function``, not the path of :func:`givens_rotate`: that calls the custom op
    ``torch.ops.qgoft.rotate`` (``ops.py``), so that ``torch.compile`` keeps it as one node.
    Both run the same forward and backward. Inputs are assumed valid.
    """

    @staticmethod
    def forward(ctx, x, params, scale, block, structure, transpose):
        y = ops.launch_forward(x, params, scale, block, structure, transpose)
        ops.setup_context(ctx, (x, params, scale, block, structure, transpose), y)
        return y

    @staticmethod
    def backward(ctx, dy):
        return ops.backward(ctx, dy)


def givens_rotate(x: torch.Tensor, params: torch.Tensor, *, block: str = "givens",
                  structure: str = "tree", scale: torch.Tensor | None = None,
                  transpose: bool = False, backend: str = "auto",
                  adapter_index: torch.Tensor | MixedBatch | None = None) -> torch.Tensor:
    """Rotate the last dimension of ``x`` by the Givens product ``R``: ``x @ R`` or ``x @ R^T``.

    Args:
        x: ``[..., d]`` activations, any float dtype; any strides.
        params: ``[P]`` angles (``block="givens"``) or ``[P, 2, 2]`` blocks (``"quasi"``),
            ``P = num_pairs(d, structure)``, in the stage-major order of ``docs/method.md`` §1.
        block: ``"givens"`` (strict rotations) or ``"quasi"`` (free 2x2 blocks).
        structure: the pair schedule; ``"tree"`` (``d - 1`` pairs in ``ceil(log2 d)`` stages).
        scale: optional ``[d]`` diagonal applied last (``x @ R``) or first (``x @ R^T``).
        transpose: apply ``R^T`` instead of ``R`` (the input gradient; the merge ``W R^T``).
        backend: ``"auto"`` (Triton for CUDA tensors, and for CPU tensors under
            ``TRITON_INTERPRET=1``, where triton is installed; else PyTorch), ``"triton"`` or ``"torch"``.
        adapter_index: a mixed batch (``x @ R`` only): ``params`` (and ``scale``) stack ``A``
            adapters along a first dimension, and this integer tensor names each row's adapter
            (``-1``: none, the row is returned unchanged), shaped as ``x``'s rows or one per
            sample; or a :class:`~qgoft_kernels.MixedBatch` built once for every layer.

    Returns:
        A tensor of ``x``'s shape and dtype, computed in float32 (float64 for float64
        ``x``); differentiable in ``x``, ``params`` and ``scale``. Equals
        ``x @ givens_matrix(d, params, block=block, structure=structure, scale=scale)``
        (``.T`` of that matrix when ``transpose``), without ever forming it.

    Example::

        x = torch.randn(4, 768, device="cuda", dtype=torch.bfloat16)
        blocks = torch.eye(2, device="cuda").repeat(qk.num_pairs(768), 1, 1)
        y = qk.givens_rotate(x, blocks, block="quasi")   # identity blocks: y == x
    """
    use = _check_inputs(x, params, block, structure, scale, transpose, backend, adapter_index is not None)
    if adapter_index is not None:
        return _rotate_mixed(use, x, params, as_batch(adapter_index, params.shape[0], x), block, structure, scale)
    if use == "torch":
        return rotate_torch(x, params, block=block, structure=structure, scale=scale, transpose=transpose)
    return torch.ops.qgoft.rotate(x, params, scale, block, structure, transpose)


def _rotate_mixed(use: str, x, params, batch: MixedBatch, block: str, structure: str, scale) -> torch.Tensor:
    if use == "torch":
        return rotate_mixed_torch(x, params, batch, block=block, structure=structure, scale=scale)
    return MixedRotationFunction.apply(x, params, scale, batch, block, structure)


def givens_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, params: torch.Tensor, *,
                  block: str = "givens", structure: str = "tree", scale: torch.Tensor | None = None,
                  backend: str = "auto", adapter_index: torch.Tensor | MixedBatch | None = None) -> torch.Tensor:
    """``F.linear(givens_rotate(x, params, ...), weight, bias)``: the forward of ``GivensLinear``.

    The same result and gradients as that composition. On the PyTorch path's dense
    formulation it is one fused op (:func:`qgoft_kernels.dense.linear_dense`), which rotates
    the rows of ``weight`` instead of those of ``x`` when that is cheaper
    (:func:`qgoft_kernels.dense.rotates_weight`); elsewhere it is the composition itself.
    """
    use = _check_inputs(x, params, block, structure, scale, False, backend, adapter_index is not None)
    if adapter_index is not None:
        batch = as_batch(adapter_index, params.shape[0], x)
        return F.linear(_rotate_mixed(use, x, params, batch, block, structure, scale), weight, bias)
    if use == "torch":
        return linear_torch(x, weight, bias, params, block=block, structure=structure, scale=scale)
    return F.linear(torch.ops.qgoft.rotate(x, params, scale, block, structure, False), weight, bias)


def rotate_by_names(owner, x: torch.Tensor, adapter_names, adapters: dict) -> torch.Tensor:
    """Each sample of ``x`` rotated by the adapter it names (``adapter_names``, one per sample):
    ``adapters`` maps names to ``(rotation, scale or None, block, structure)``; a name it lacks
    (``"__base__"``, or an adapter this layer does not have) leaves the sample unchanged.

    Every adapter of a block kind is stacked (kept on ``owner`` while none changes), and each
    kind that some sample names takes one launch.
    """
    groups: dict = {}
    for name in sorted(adapters):
        groups.setdefault(adapters[name][2:], []).append(name)
    wanted = set(adapter_names)
    for (block, structure), names in groups.items():
        if wanted.isdisjoint(names):
            continue
        params, scale = mixed.stacked_adapters(owner, names, [adapters[n][0] for n in names],
                                               [adapters[n][1] for n in names])
        x = givens_rotate(x, params, block=block, structure=structure, scale=scale,
                          adapter_index=mixed.names_to_batch(adapter_names, names, x.device))
    return x
