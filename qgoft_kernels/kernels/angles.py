"""The strict rotations' coefficients: ``(cos theta, sin theta)`` per pair, in one launch."""
import torch
import triton
import triton.language as tl

from .launch import new_output


@triton.jit
def _givens_angles_kernel(theta, coefs, n, BLOCK: tl.constexpr):
    """``coefs[p] = (cos theta[p], sin theta[p])`` for ``BLOCK`` pairs, in ``coefs``' dtype."""
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = o < n
    b_t = tl.load(theta + o, mask=m, other=0.0).to(coefs.dtype.element_ty)
    tl.store(coefs + 2 * o, tl.cos(b_t), mask=m)
    tl.store(coefs + 2 * o + 1, tl.sin(b_t), mask=m)


def givens_coefs(theta: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[P, 2]`` of ``(cos, sin)`` in ``dtype`` (float32 or float64) for the angles ``theta`` ``[P]``."""
    coefs = new_output((theta.shape[0], 2), dtype, theta.device)
    if theta.shape[0]:
        block = 1024
        _givens_angles_kernel[(triton.cdiv(theta.shape[0], block),)](
            theta=theta.contiguous(), coefs=coefs, n=theta.shape[0], BLOCK=block, num_warps=4)
    return coefs
