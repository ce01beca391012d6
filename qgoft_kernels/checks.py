"""Argument checks shared by every entry point, below everything that uses them.

The functional API, the reference, the modules, the adapter files and the PEFT layer all
check their options and parameter shapes here, so no module imports back up the stack.
"""
from __future__ import annotations

import torch

from .schedule import STRUCTURES, num_pairs

BLOCKS = ("givens", "quasi")


def describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_float(name: str, t) -> None:
    """Raise a ``TypeError`` unless ``t`` is a floating-point tensor."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {t.dtype}")


def check_options(block: str, structure: str) -> None:
    """Raise a clear error unless ``block`` and ``structure`` are known."""
    if not isinstance(block, str) or block not in BLOCKS:
        raise ValueError(f"block must be one of {BLOCKS}, got {block!r}")
    if not isinstance(structure, str) or structure not in STRUCTURES:
        raise ValueError(f"structure must be one of {STRUCTURES}, got {structure!r}")


def rotation_shape(d: int, block: str, structure: str = "tree") -> tuple[int, ...]:
    """Shape of the rotation parameters for ``d`` features: ``(P,)`` angles or ``(P, 2, 2)`` blocks."""
    check_options(block, structure)
    n = num_pairs(d, structure)
    return (n,) if block == "givens" else (n, 2, 2)


def check_params(d: int, params, block: str, structure: str, scale) -> None:
    """Raise a clear error unless ``params`` (and ``scale``) fit ``d`` features."""
    check_options(block, structure)
    check_float("params", params)
    expected = rotation_shape(d, block, structure)
    if tuple(params.shape) != expected:
        raise ValueError(f"params for block={block!r}, structure={structure!r} and d={d} (x's last dimension) "
                         f"must have shape {expected}, got {describe(params)}")
    if scale is not None:
        check_float("scale", scale)
        if tuple(scale.shape) != (d,):
            raise ValueError(f"scale must have shape ({d},) for d={d}, got {describe(scale)}")
        if scale.device != params.device:
            raise ValueError(f"scale and params must be on one device: scale is on {scale.device}, "
                             f"params on {params.device}")


def check_features(x, in_features: int) -> None:
    """Raise a clear error unless ``x`` is a tensor whose last dimension is ``in_features``."""
    check_float("x", x)
    if x.dim() < 1 or x.shape[-1] != in_features:
        width = x.shape[-1] if x.dim() else "no"
        raise ValueError(f"x has {width} features (its last dimension); this layer takes "
                         f"in_features={in_features}; got {describe(x)}")
