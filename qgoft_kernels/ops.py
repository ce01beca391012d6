"""The Triton path as ``torch.library`` custom ops: ``qgoft::rotate`` and its backward.

``torch.compile`` sees each as one opaque op (no graph break, no tracing into Triton's
launcher) with a fake implementation for shapes and a registered autograd formula, so a
model built from ``GivensLinear`` compiles with ``fullgraph=True``. Eagerly, the same ops
run the kernels directly. Inputs are assumed valid: :func:`qgoft_kernels.givens_rotate`
checks them before calling here.
"""
from typing import Optional

import torch

from .checks import NO_TRITON, check_triton_mode, triton_available


def _kernels():
    # Imported on first use: under TRITON_INTERPRET=1, triton.jit must see the variable when
    # the kernels are defined, and `python -m qgoft_kernels verify` sets it only then.
    if not triton_available():
        raise ImportError(NO_TRITON)
    from . import kernels
    check_triton_mode()
    return kernels


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as ``[rows, d]`` with unit column stride (a view when possible)."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _coefs(params: torch.Tensor) -> torch.Tensor:
    """What the kernels read per pair: the blocks ``[P, 2, 2]`` or the angles ``[P]`` (whose
    cosines and sines each program takes in float32, float64 for float64 ``x``)."""
    return params.contiguous()


def launch_forward(x, params, scale, block: str, structure: str, transpose: bool) -> torch.Tensor:
    """``x @ R`` (or ``x @ R^T``) by the Triton kernels; a new contiguous tensor of ``x``'s shape."""
    y = _kernels().givens_fwd(_as_rows(x), _coefs(params),
                              None if scale is None else scale.contiguous(),
                              quasi=block == "quasi", transpose=transpose)
    return y.view(x.shape)


def launch_backward(x, dy, params, scale, block: str, structure: str, transpose: bool,
                    need_dx: bool, need_dparams: bool, need_dscale: bool):
    """``(dx, dparams, dscale)`` by the Triton kernels, ``None`` where not asked for."""
    dx, dparams, dscale = _kernels().givens_bwd(
        _as_rows(x), _as_rows(dy), _coefs(params),
        None if scale is None else scale.contiguous(), quasi=block == "quasi",
        transpose=transpose, need_dx=need_dx, need_dparams=need_dparams, need_dscale=need_dscale)
    return (None if dx is None else dx.view(x.shape),
            None if dparams is None else dparams.to(params.dtype),
            None if dscale is None else dscale.to(scale.dtype))


@torch.library.custom_op("qgoft::rotate", mutates_args=())
def rotate(x: torch.Tensor, params: torch.Tensor, scale: Optional[torch.Tensor], block: str, structure: str,
           transpose: bool) -> torch.Tensor:
    return launch_forward(x, params, scale, block, structure, transpose)


@rotate.register_fake
def _(x, params, scale, block, structure, transpose):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("qgoft::rotate_backward", mutates_args=())
def rotate_backward(x: torch.Tensor, dy: torch.Tensor, params: torch.Tensor, scale: Optional[torch.Tensor],
                    block: str, structure: str, transpose: bool, need_dx: bool, need_dparams: bool,
                    need_dscale: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = launch_backward(x, dy, params, scale, block, structure, transpose, need_dx, need_dparams, need_dscale)
    # a custom op returns tensors: an empty one stands for a gradient not asked for
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


@rotate_backward.register_fake
def _(x, dy, params, scale, block, structure, transpose, need_dx, need_dparams, need_dscale):
    def like(t, need):
        return torch.empty_like(t, memory_format=torch.contiguous_format) if need else x.new_empty(0)
    return like(x, need_dx), like(params, need_dparams), like(scale, need_dscale)


def setup_context(ctx, inputs, output) -> None:
    x, params, scale, block, structure, transpose = inputs
    ctx.save_for_backward(x, params, scale)
    ctx.block, ctx.structure, ctx.transpose = block, structure, transpose


def backward(ctx, dy):
    """The gradients of ``rotate``: one backward launch; only what autograd asks for."""
    x, params, scale = ctx.saved_tensors
    need_dx, need_dparams, need_dscale = ctx.needs_input_grad[:3]
    need_dscale = need_dscale and scale is not None
    dx, dparams, dscale = torch.ops.qgoft.rotate_backward(x, dy, params, scale, ctx.block, ctx.structure,
                                                          ctx.transpose, need_dx, need_dparams, need_dscale)
    return (dx if need_dx else None, dparams if need_dparams else None, dscale if need_dscale else None,
            None, None, None)


rotate.register_autograd(backward, setup_context=setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("givens_rotate's Triton path supports first-order gradients only (its backward is a "
                       "hand-written kernel); for second derivatives use backend='torch'")


# differentiating the backward (create_graph=True, then backward again) says so clearly
rotate_backward.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)
