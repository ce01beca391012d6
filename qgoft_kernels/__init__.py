"""Fused Triton kernels for quasi-Givens orthogonal fine-tuning (qGOFT, arXiv 2404.04316).

``GivensLinear`` adapts a frozen ``nn.Linear`` as ``F.linear(x @ R, W, b)``, with ``R`` a
product of ``ceil(log2 d)`` stages of disjoint 2x2 blocks applied to the activations in one
fused pass; ``givens_rotate`` is the functional form. See README.md and docs/.
"""
from ._version import __version__
from .checkpoint import convert_official, load_adapter, load_official, save_adapter
from .function import MAX_TRITON_DIM, GivensRotationFunction, givens_rotate
from .mixed import MixedBatch
from .nn import (
    GivensLinear,
    GivensWrapper,
    adapter_names,
    count_parameters,
    inject,
    merge,
    orthogonality_penalty,
    print_trainable_parameters,
    trainable_parameters,
    use_adapters,
)
from .reference import givens_matrix
from .schedule import num_pairs, num_stages

__all__ = [
    "MAX_TRITON_DIM",
    "GivensLinear",
    "GivensWrapper",
    "GivensRotationFunction",
    "MixedBatch",
    "adapter_names",
    "convert_official",
    "count_parameters",
    "givens_matrix",
    "givens_rotate",
    "inject",
    "load_adapter",
    "load_official",
    "merge",
    "num_pairs",
    "num_stages",
    "orthogonality_penalty",
    "print_trainable_parameters",
    "save_adapter",
    "trainable_parameters",
    "use_adapters",
    "__version__",
]
