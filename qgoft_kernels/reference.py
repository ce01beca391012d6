"""Pure-PyTorch reference: the dense oracle and the stage-wise rotation (the CPU path).

Nothing clever here on purpose: the tests trust this file, so it follows ``docs/method.md`` §1
line by line and lets autograd differentiate through plain torch ops.
"""
from __future__ import annotations

import torch

from .checks import check_params
from .schedule import schedule, stage_indices


def blocks_from_params(params: torch.Tensor, block: str) -> torch.Tensor:
    """The 2x2 blocks ``[P, 2, 2]`` of either parameterisation.

    ``block="givens"``: ``params`` are angles ``[P]`` and each block is
    ``[[cos t, -sin t], [sin t, cos t]]``. ``block="quasi"``: ``params`` already are the
    blocks ``[P, 2, 2]``.
    """
    if block == "quasi":
        return params
    c, s = torch.cos(params), torch.sin(params)
    return torch.stack((torch.stack((c, -s), -1), torch.stack((s, c), -1)), -2)


def givens_matrix(d: int, params: torch.Tensor, *, block: str = "givens", structure: str = "tree",
                  scale: torch.Tensor | None = None) -> torch.Tensor:
    """Dense ``R = P_L @ ... @ P_1 @ diag(scale)``, shape ``[d, d]``, in the dtype of ``params``.

    The oracle of the tests: build it from float64 parameters for a float64 ``R``. Each
    stage matrix ``P_r`` is an identity with the blocks of stage ``r`` written at
    ``[i,i], [i,j], [j,i], [j,j]``. Differentiable in ``params`` and ``scale``.

    Example::

        R = givens_matrix(8, torch.randn(7, dtype=torch.float64))
        y = x @ R          # equals givens_rotate(x, params)
    """
    check_params(d, params, block, structure, scale)
    sched = schedule(d, structure)
    B = blocks_from_params(params, block)
    R = torch.eye(d, dtype=params.dtype, device=params.device)
    for r, (i, j) in enumerate(stage_indices(d, structure, params.device), start=1):
        b = B[sched.offsets[r - 1]:sched.offsets[r]]
        P = torch.eye(d, dtype=params.dtype, device=params.device)
        P[i, i], P[i, j], P[j, i], P[j, j] = b[:, 0, 0], b[:, 0, 1], b[:, 1, 0], b[:, 1, 1]
        R = P @ R
    if scale is not None:
        R = R * scale.to(R.dtype)
    return R


def rotate_reference(x: torch.Tensor, params: torch.Tensor, *, block: str = "givens",
                     structure: str = "tree", scale: torch.Tensor | None = None,
                     transpose: bool = False) -> torch.Tensor:
    """``x @ R`` (or ``x @ R^T``) stage by stage with torch ops; no ``d x d`` matrix.

    Computes in float32 (float64 if ``x`` is float64) and returns ``x.dtype``. Inputs are
    assumed valid; :func:`qgoft_kernels.givens_rotate` checks them.
    """
    d = x.shape[-1]
    sched = schedule(d, structure)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.to(compute)
    B = blocks_from_params(params.to(compute), block)
    s = None if scale is None else scale.to(compute)
    stages = list(enumerate(stage_indices(d, structure, x.device), start=1))
    if transpose and s is not None:
        y = y * s
    for r, (i, j) in (stages if transpose else reversed(stages)):
        b = B[sched.offsets[r - 1]:sched.offsets[r]]
        yi, yj = y[..., i], y[..., j]
        if transpose:
            # x @ P^T: each block acts transposed
            ni = b[:, 0, 0] * yi + b[:, 0, 1] * yj
            nj = b[:, 1, 0] * yi + b[:, 1, 1] * yj
        else:
            ni = b[:, 0, 0] * yi + b[:, 1, 0] * yj
            nj = b[:, 0, 1] * yi + b[:, 1, 1] * yj
        y = y.index_copy(-1, i, ni).index_copy(-1, j, nj)
    if not transpose and s is not None:
        y = y * s
    return y.to(x.dtype)

