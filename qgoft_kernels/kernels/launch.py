"""Launch heuristics: rows per program, warps, and the backward's program count.

One heuristic, keyed on the padded row length ``D_PAD`` (the register tile is
``BLOCK_N x D_PAD`` fp32 values) and the device. The environment variables below pin a
configuration, for tests, for the interpreter and for tuning runs (docs/environment.md):

- ``QGOFT_BLOCK_N``: rows per program (a power of two);
- ``QGOFT_NUM_WARPS``: warps per program;
- ``QGOFT_BWD_PROGRAMS``: programs of the backward kernel (each reduces its rows'
  parameter gradients in registers, so this fixes the deterministic reduction order);
- ``QGOFT_POISON``: fill kernel outputs with NaN before the launch, so that an element a
  kernel fails to write shows up (tests and ``verify`` set it).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton.language as tl


@dataclass(frozen=True)
class Config:
    block_n: int
    num_warps: int


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        out = int(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if out < 1:
        raise ValueError(f"{name} must be >= 1, got {out}")
    return out


def _pinned(block_n: int, num_warps: int) -> Config:
    pin_n, pin_w = _env_int("QGOFT_BLOCK_N"), _env_int("QGOFT_NUM_WARPS")
    if pin_n is not None and pin_n & (pin_n - 1):
        raise ValueError(f"QGOFT_BLOCK_N must be a power of two, got {pin_n}")
    return Config(pin_n or block_n, pin_w or num_warps)


def _heuristic(d_pad: int, n_rows: int, device: torch.device, tile: int) -> Config:
    if device.type != "cuda":
        # the interpreter pays per operation, not per element: few large programs
        return _pinned(max(1, min(64, 4096 // d_pad)), 1)
    block_n = max(1, min(256, tile // d_pad))
    # no more rows per program than the input has
    block_n = min(block_n, max(1, 1 << (n_rows - 1).bit_length()))
    elems = block_n * d_pad
    num_warps = 4 if elems <= 2048 else 8 if elems <= 8192 else 16 if elems <= 16384 else 32
    return _pinned(block_n, num_warps)


def forward_config(d_pad: int, n_rows: int, device: torch.device) -> Config:
    return _heuristic(d_pad, n_rows, device, tile=4096)


def backward_config(d_pad: int, n_rows: int, device: torch.device) -> Config:
    # the backward keeps about four tiles' worth of values live: smaller tiles
    return _heuristic(d_pad, n_rows, device, tile=2048)


def backward_programs(n_blocks: int, device: torch.device) -> int:
    """How many programs share the backward's row blocks (one partial gradient each)."""
    pinned = _env_int("QGOFT_BWD_PROGRAMS")
    if pinned is None:
        pinned = 2 * _sm_count(device) if device.type == "cuda" else 4
    return max(1, min(n_blocks, pinned))


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def acc_dtype(dtype: torch.dtype):
    """The kernels compute in float32, or float64 for float64 inputs."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def new_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An output buffer the kernel overwrites completely (NaN-filled under ``QGOFT_POISON``)."""
    if os.environ.get("QGOFT_POISON", "0") not in ("", "0"):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def round_bf16(x: torch.Tensor) -> bool:
    """Round bf16 outputs explicitly: only needed where the interpreter runs the kernel."""
    return x.dtype == torch.bfloat16 and x.device.type != "cuda"
