"""Fused Triton kernels for quasi-Givens orthogonal fine-tuning (qGOFT, arXiv 2404.04316).

``GivensLinear`` adapts a frozen ``nn.Linear`` as ``F.linear(x @ R, W, b)``, with ``R`` a
product of ``ceil(log2 d)`` stages of disjoint 2x2 blocks applied to the activations in one
fused pass; ``givens_rotate`` is the functional form. See README.md and docs/.
"""
from .function import MAX_TRITON_DIM, GivensRotationFunction, givens_rotate
from .nn import GivensLinear, orthogonality_penalty
from .reference import givens_matrix
from .schedule import num_pairs, num_stages

__all__ = [
    "MAX_TRITON_DIM",
    "GivensLinear",
    "GivensRotationFunction",
    "givens_matrix",
    "givens_rotate",
    "num_pairs",
    "num_stages",
    "orthogonality_penalty",
]
__version__ = "0.1.0"
