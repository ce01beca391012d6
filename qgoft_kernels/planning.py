"""Planning mode: run the package's launch path on ``meta`` tensors as if on a GPU.

``benchmarks/sass.py`` (the static cost model) uses it to learn, without a GPU, exactly
which kernels an op launches and with which arguments: inside :func:`planning`,
``givens_rotate`` dispatches ``meta`` tensors to the Triton path and the launchers pick
their GPU configurations for a device with ``sms`` multiprocessors. Nothing here imports
Triton, so it does not disturb the interpreter switch (``ops._kernels``).
"""
from __future__ import annotations

import contextlib

_STATE = {"on": False, "sms": 132}


@contextlib.contextmanager
def planning(sms: int = 132):
    """Within the block, treat ``meta`` tensors as CUDA tensors of a GPU with ``sms`` SMs."""
    saved = dict(_STATE)
    _STATE.update(on=True, sms=sms)
    try:
        yield
    finally:
        _STATE.update(saved)


def active() -> bool:
    return _STATE["on"]


def sms() -> int:
    return _STATE["sms"]


def as_gpu(device) -> bool:
    """True for CUDA devices, and for ``meta`` ones while planning."""
    return device.type == "cuda" or (_STATE["on"] and device.type == "meta")
