"""The ``backend="torch"`` path: stage sweeps or dense factors, whichever is faster.

Two formulations compute the same ``x @ R`` (or ``x @ R^T``) with the same contract:

- ``"sweeps"`` (:mod:`qgoft_kernels.sweeps`): the kernels' algorithm in torch ops, a few
  ops per stage over the activations. Least work (``O(rows d)``), but about ten ops per
  stage, each a pass over a strided slice, and autograd keeps every stage's intermediates.
- ``"dense"`` (:mod:`qgoft_kernels.dense`): ``R``'s dense factors built once per call from
  the parameters, applied with a batched matmul; ``O(rows d b)`` flops in a few BLAS calls.

``"auto"`` takes the rule of :func:`choose`, measured on a 2-core x86_64 CPU with
``python -m benchmarks.crossover`` (docs/benchmarks.md, "The PyTorch path's formulations").
``QGOFT_TORCH_PATH`` forces one formulation and ``QGOFT_DENSE_BLOCK`` pins the dense block
width (docs/environment.md).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .dense import DEFAULT_BLOCK, fused_linear_applies, linear_dense, rotate_dense
from .sweeps import rotate_sweeps

FORMULATIONS = ("auto", "sweeps", "dense")


def formulation() -> str:
    """``QGOFT_TORCH_PATH`` (``auto`` when unset), checked."""
    value = os.environ.get("QGOFT_TORCH_PATH", "auto").strip().lower() or "auto"
    if value not in FORMULATIONS:
        raise ValueError(f"QGOFT_TORCH_PATH must be one of {FORMULATIONS}, got {value!r}")
    return value


def dense_block() -> int:
    """``QGOFT_DENSE_BLOCK`` (a power of two >= 1), else :data:`DEFAULT_BLOCK`."""
    value = os.environ.get("QGOFT_DENSE_BLOCK", "").strip()
    if not value:
        return DEFAULT_BLOCK
    # str.isdigit() also takes digits int() refuses (superscripts: "²"); only ASCII digits here
    if not (value.isascii() and value.isdigit()) or int(value) < 1 or int(value) & (int(value) - 1):
        raise ValueError(f"QGOFT_DENSE_BLOCK must be a power of two >= 1, got {value!r}")
    return int(value)


#: Where the sweeps win (measured, docs/benchmarks.md): ``(smallest d, rows per that many
#: features)`` for a pass that will be differentiated and for one that will not.
SWEEPS_WIN = {True: (16384, 16384), False: (8192, 2048)}


def choose(d: int, rows: int, training: bool = True) -> str:
    """The faster formulation for ``rows`` rows of ``d`` features on a CPU (measured).

    On a 2-core x86_64 CPU (``python -m benchmarks.crossover``) the dense factors win at every
    measured ``d <= 1024``, one row included: their few BLAS calls replace ``~10 L`` small
    ops. Past that, for a handful of rows, building and applying the blocks (``O(d b)``
    whatever the rows) is no longer small next to the sweeps' ``O(rows d L)``: for the
    inference forward the sweeps win from ``d = 8192`` up to about ``d / 2048`` rows; for a
    training pass, whose backward the dense blocks do in two more BLAS calls while the
    sweeps replay every stage, they only tie, at one row of ``d = 16384`` (taken as ``d /
    16384`` rows from there).
    """
    smallest, per = SWEEPS_WIN[bool(training)]
    return "sweeps" if d >= smallest and rows * per <= d else "dense"


def _training(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd will record this call: grad mode on and an input requiring grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _functorch_active() -> bool:
    """Whether a ``torch.func`` transform (``vmap``, ``grad``, ``jacrev``, ...) is running."""
    try:
        from torch._C._functorch import peek_interpreter_stack
    except ImportError:  # pragma: no cover - every torch this package supports has it
        return False
    return peek_interpreter_stack() is not None


def _formulation_for(x: torch.Tensor, params: torch.Tensor, scale: torch.Tensor | None) -> str:
    """The formulation for this call: ``QGOFT_TORCH_PATH``, or the rule's pick when ``auto``;
    the sweeps under a ``torch.func`` transform, whatever is asked: they are plain tensor ops,
    which the transforms take, while the dense formulation's hand-written autograd Functions
    are not written for them."""
    use = formulation()
    if _functorch_active():
        return "sweeps"
    if use == "auto":
        d = x.shape[-1]
        use = choose(d, x.numel() // d, _training(x, params, scale))
    return use


def _rotate(use: str, width: int, x, params, *, block, structure, scale, transpose) -> torch.Tensor:
    if use == "sweeps":
        return rotate_sweeps(x, params, block=block, structure=structure, scale=scale, transpose=transpose)
    return rotate_dense(x, params, block=block, structure=structure, scale=scale, transpose=transpose,
                        block_width=width)


def rotate_torch(x: torch.Tensor, params: torch.Tensor, *, block: str = "givens", structure: str = "tree",
                 scale: torch.Tensor | None = None, transpose: bool = False) -> torch.Tensor:
    """``x @ R`` (or ``x @ R^T``) on the PyTorch path, by the formulation asked for or chosen.

    Inputs are assumed valid; :func:`qgoft_kernels.givens_rotate` checks them.
    """
    return _rotate(_formulation_for(x, params, scale), dense_block(), x, params, block=block, structure=structure,
                   scale=scale, transpose=transpose)


def linear_torch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, params: torch.Tensor, *,
                 block: str, structure: str, scale: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x @ R, weight, bias)`` on the PyTorch path: fused on the dense formulation
    where :func:`qgoft_kernels.dense.fused_linear_applies`, else the composition."""
    use, width = _formulation_for(x, params, scale), dense_block()
    if use == "dense" and fused_linear_applies(x, weight, width):
        return linear_dense(x, weight, bias, params, block=block, structure=structure, scale=scale, block_width=width)
    rotated = _rotate(use, width, x, params, block=block, structure=structure, scale=scale, transpose=False)
    return F.linear(rotated, weight, bias)
