"""Planning mode: run the package's launch path on ``meta`` tensors as if on a GPU.

``benchmarks/sass.py`` (the static cost model) uses it to learn, without a GPU, exactly
which kernels an op launches and with which arguments: inside :func:`planning`,
``givens_rotate`` dispatches ``meta`` tensors to the Triton path and the launchers pick
their GPU configurations for a device with ``sms`` multiprocessors. Nothing here imports
Triton, so it does not disturb the interpreter switch (``ops._kernels``).
"""
from __future__ import annotations

import contextlib

_STATE = {"on": False, "sms": 132, "resources": None}

#: per-SM limits of compute capability 9.0 (H100, H200): registers, warps, resident CTAs, shared
#: memory (bytes), shared memory the system reserves per CTA
SM90 = dict(regs=65536, warps=64, ctas=32, smem=233472, smem_reserved=1024)


@contextlib.contextmanager
def planning(sms: int = 132, resources=None):
    """Within the block, treat ``meta`` tensors as CUDA tensors of a GPU with ``sms`` SMs.

    ``resources(kernel, kwargs)`` returns ``(registers, shared bytes)`` of ``kernel`` compiled
    for those launch arguments, so the launchers can size their grids from the real occupancy.
    """
    saved = dict(_STATE)
    _STATE.update(on=True, sms=sms, resources=resources)
    try:
        yield
    finally:
        _STATE.update(saved)


def active() -> bool:
    return _STATE["on"]


def sms() -> int:
    return _STATE["sms"]


def launch_key(kernel, kwargs: dict) -> tuple:
    """What of a launch's keyword arguments selects its compiled binary: each constexpr's value,
    a tensor's dtype and 16-byte alignment, an integer's divisibility by 16 and equality to 1
    (the JIT's specialisation, unless the kernel asks for none), anything else itself."""
    constexprs = {p.name for p in kernel.params if p.is_constexpr}
    unspecialised = {p.name for p in kernel.params if p.do_not_specialize}

    def one(name, value):
        if name in constexprs:
            return repr(value)
        if name in unspecialised:
            return "-"
        if hasattr(value, "data_ptr") and hasattr(value, "dtype"):
            return (str(value.dtype), value.data_ptr() % 16 == 0)
        if isinstance(value, int) and not isinstance(value, bool):
            return (value % 16 == 0, value == 1)
        return repr(value)
    return (id(kernel),) + tuple(sorted((k, one(k, v)) for k, v in kwargs.items()))


def resources():
    """The planner's ``(kernel, kwargs) -> (registers, shared bytes)``, or ``None``."""
    return _STATE["resources"]


def resident_ctas(regs: int, warps: int, smem: int, limits: dict = SM90) -> int:
    """CTAs of ``warps`` warps, ``regs`` registers per thread and ``smem`` shared bytes that one SM
    holds at once: registers are allocated per warp in granules of 256, then the warp, CTA and
    shared-memory limits."""
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = (limits["regs"] // per_warp) // warps
    by_smem = limits["smem"] // (smem + limits["smem_reserved"])
    return max(0, min(limits["ctas"], limits["warps"] // warps, by_regs, by_smem))


def as_gpu(device) -> bool:
    """True for CUDA devices, and for ``meta`` ones while planning."""
    return device.type == "cuda" or (_STATE["on"] and device.type == "meta")
