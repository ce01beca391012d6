"""The kernels' algorithm in plain PyTorch ops: the ``backend="torch"`` path (and the CPU's).

Same compact sweeps as the Triton kernels (docs/math.md §1–2): a row is padded to
``D = 2**L``, split into even/odd halves once per stage, and stage ``r`` updates only its
``D >> r`` pairs, so a call costs a few passes over ``x`` instead of one per stage.
Autograd differentiates through it; :func:`qgoft_kernels.reference.rotate_reference` (one
index-copy per stage, nothing clever) is what tests check it against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import blocks_from_params
from .schedule import num_stages, param_offsets


def _stage_blocks(B: torch.Tensor, offsets, r: int, n: int):
    """Stage ``r``'s blocks for its ``n`` slots (identity past the pair count), as 4 vectors."""
    b = B[offsets[r - 1]:offsets[r]]
    if b.shape[0] < n:
        b = torch.cat((b, torch.eye(2, dtype=B.dtype, device=B.device).expand(n - b.shape[0], 2, 2)))
    return b[:, 0, 0], b[:, 0, 1], b[:, 1, 0], b[:, 1, 1]


def _interleave(even: torch.Tensor, odd: torch.Tensor) -> torch.Tensor:
    return torch.stack((even, odd), -1).flatten(-2)


def rotate_sweeps(x: torch.Tensor, params: torch.Tensor, *, block: str = "givens", structure: str = "tree",
                  scale: torch.Tensor | None = None, transpose: bool = False) -> torch.Tensor:
    """``x @ R`` (or ``x @ R^T``) by compact sweeps; float32 compute (float64 for float64 ``x``).

    Inputs are assumed valid; :func:`qgoft_kernels.givens_rotate` checks them.
    """
    d = x.shape[-1]
    offsets = param_offsets(d, structure)
    L = num_stages(d)
    D = 1 << L
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    B = blocks_from_params(params.to(compute), block)
    s = None if scale is None else scale.to(compute)
    y = F.pad(x.to(compute), (0, D - d))
    if s is not None:
        s = F.pad(s, (0, D - d))
    if transpose:
        if s is not None:
            y = y * s
        outs = []
        for r in range(1, L + 1):
            b00, b01, b10, b11 = _stage_blocks(B, offsets, r, D >> r)
            lo, hi = y[..., 0::2], y[..., 1::2]
            # the odd outputs are final: no later stage touches them
            outs.append(b10 * lo + b11 * hi)
            y = b00 * lo + b01 * hi
        for r in range(L, 0, -1):
            y = _interleave(y, outs[r - 1])
    else:
        his = []
        for _ in range(L):
            his.append(y[..., 1::2])
            y = y[..., 0::2]
        for r in range(L, 0, -1):
            b00, b01, b10, b11 = _stage_blocks(B, offsets, r, D >> r)
            hi = his[r - 1]
            y = _interleave(b00 * y + b10 * hi, b01 * y + b11 * hi)
        if s is not None:
            y = y * s
    # contiguous like the kernels' output (and like x usually is: a strided result can send
    # the next matmul down another BLAS path, with other rounding)
    return y[..., :d].to(x.dtype).contiguous()
