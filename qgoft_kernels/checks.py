"""Argument checks shared by every entry point, below everything that uses them.

The functional API, the reference, the modules, the adapter files and the PEFT layer all
check their options and parameter shapes here, so no module imports back up the stack.
"""
from __future__ import annotations

import functools
import os
import sys

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


# the values triton itself reads as true in TRITON_INTERPRET
_TRUE = ("1", "true", "yes", "on", "y")
#: the spellings this package's own switches take, any case (anything else is refused)
ON, OFF = ("1", "true", "on", "yes"), ("0", "false", "off", "no")


def env_flag(name: str, default: bool, meaning: tuple[str, str] = ("on", "off")) -> bool:
    """The switch ``name`` read now: :data:`ON` or :data:`OFF` in any case, ``default`` when unset
    or empty; any other value raises a ``ValueError`` naming the variable (``meaning``: what
    each side does, for that message)."""
    raw = os.environ.get(name, "")
    value = raw.strip().lower()
    if not value:
        return default
    if value in ON:
        return True
    if value in OFF:
        return False
    raise ValueError(f"{name}={raw!r}: expected one of {', '.join(ON)} ({meaning[0]}) or {', '.join(OFF)} "
                     f"({meaning[1]}), any case")


def interpreting() -> bool:
    """Whether ``TRITON_INTERPRET`` asks, now, for Triton's CPU interpreter (parsed as triton does)."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in _TRUE


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether triton can be imported here (it publishes Linux wheels only; the package installs
    it on Linux and runs the PyTorch path without it)."""
    import importlib.util

    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a broken install, or a finder that refuses it
        return False


NO_TRITON = ("the Triton path needs triton, which is not installed here: triton publishes wheels for Linux "
             "only (`pip install triton` there); elsewhere use backend='torch' (what backend='auto' picks "
             "without triton)")


def check_triton_mode() -> None:
    """Raise a clear error when the Triton functions were defined in another mode than
    ``TRITON_INTERPRET`` asks for now.

    ``triton.jit`` reads the variable when it decorates a function: triton's own library at
    ``import triton``, this package's kernels at their first use. Set after triton was
    imported (by peft, transformers or an optimizer step), it makes the kernels interpreted
    while triton's library helpers are not, and only some launches fail, with triton's
    ``Cannot call @triton.jit'd outside of the scope of a kernel``.
    """
    _check_triton_mode(os.environ.get("TRITON_INTERPRET", ""))


@functools.lru_cache(maxsize=None)
def _check_triton_mode(flag: str) -> None:
    import triton.language.standard
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import KernelInterface

    want = interpreting()
    modules = [("triton", triton.language.standard)]
    modules += [(name, m) for name, m in sorted(sys.modules.items()) if name.startswith("qgoft_kernels.kernels.")]
    for name, module in modules:
        fn = next((v for v in vars(module).values() if isinstance(v, KernelInterface)), None)
        if fn is not None and isinstance(fn, InterpretedFunction) != want:
            have = "the interpreter" if not want else "compiled GPU kernels"
            raise RuntimeError(
                f"TRITON_INTERPRET={flag!r} asks for {'the interpreter' if want else 'compiled GPU kernels'}, but "
                f"{name}'s functions were defined for {have}: triton reads TRITON_INTERPRET once, when it defines "
                f"them (at `import triton`, and when qgoft_kernels first runs its kernels). Set TRITON_INTERPRET=1 "
                f"before anything imports triton (at the start of the process, `TRITON_INTERPRET=1 python ...`, or "
                f"before importing peft, transformers or anything else that imports triton), or leave it unset for "
                f"GPU kernels, in a fresh process.")
