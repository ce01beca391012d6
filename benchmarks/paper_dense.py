"""The paper's own training-time method, re-implemented from ``docs/method.md`` for comparison.

The official qGOFT code (ArthurLeoM/peft-givens, 2024) rebuilds the dense ``d x d`` matrix
``R = P_L ... P_1 (diag(s))`` at every forward. Each stage matrix ``P_r`` is an identity
with its 2x2 blocks written in, converted to a sparse COO tensor, and multiplied into the
running product. Then ``x @ R`` is done by matmul in fp32, cast back, and passed through
the frozen linear. This module does the same steps with our parameter layout. It is written
from the description in ``docs/method.md`` §2, not copied, and checked against ``givens_matrix``
in ``benchmarks/test_bench.py``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from qgoft_kernels import GivensLinear
from qgoft_kernels.reference import blocks_from_params
from qgoft_kernels.schedule import schedule, stage_indices


class PaperDenseGivensLinear(GivensLinear):
    """Same parameters and result as :class:`GivensLinear`; the dense-``R`` training path."""

    def dense_rotation(self) -> torch.Tensor:
        d = self.in_features
        sched = schedule(d, self.structure)
        B = blocks_from_params(self.rotation, self.block)
        R = torch.eye(d, device=B.device, dtype=torch.float32)
        if self.scale is not None:
            R = torch.diag(self.scale)
        for r, (i, j) in enumerate(stage_indices(d, self.structure, B.device), start=1):
            b = B[sched.offsets[r - 1]:sched.offsets[r]]
            P = torch.eye(d, device=B.device, dtype=torch.float32)
            P = P.index_put((i, i), b[:, 0, 0]).index_put((i, j), b[:, 0, 1])
            P = P.index_put((j, i), b[:, 1, 0]).index_put((j, j), b[:, 1, 1])
            R = torch.sparse.mm(P.to_sparse(), R)
        return R

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # R = P_L ... P_1 diag(s): the running product is built from the left, stage 1 first
        return F.linear((x.float() @ self.dense_rotation()).to(x.dtype), self.weight, self.bias)
