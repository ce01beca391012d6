"""Triton kernels and their launchers. Importing this module defines the kernels, so under
the interpreter ``TRITON_INTERPRET=1`` must be set first."""
from .backward import givens_bwd
from .forward import givens_fwd, givens_fwd_mixed

__all__ = ["givens_fwd", "givens_fwd_mixed", "givens_bwd"]
