"""Launch heuristics: chunk width, rows per program, warps, and the backward's groups.

A program holds a ``BLOCK_N x CHUNK`` register tile (fp32). The chunk width bounds what a
program keeps live whatever ``d`` is: rows longer than the chunk are split into ``K``
chunks plus a small tile of chunk roots (docs/math.md §4). The environment variables
below pin a configuration, for tests, for the interpreter and for tuning runs
(docs/environment.md):

- ``QGOFT_CHUNK``: chunk width, a power of two (capped at the padded row length);
- ``QGOFT_BLOCK_N``: rows per program, a power of two;
- ``QGOFT_NUM_WARPS``: warps per program;
- ``QGOFT_BWD_PROGRAMS``: row groups of the backward (each produces one partial row of the
  parameter gradients, so this fixes the deterministic reduction order);
- ``QGOFT_POISON``: fill kernel outputs with NaN before the launch, so that an element a
  kernel fails to write shows up (tests and ``verify`` set it).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton.language as tl

#: Largest chunk on a GPU: forward and backward (the backward keeps ~4x more state live).
GPU_CHUNK = {"fwd": 4096, "bwd": 1024}
#: Largest chunk in the interpreter: small, so that multi-chunk rows get tested on the CPU.
INTERPRETER_CHUNK = 128


@dataclass(frozen=True)
class Config:
    block_n: int
    num_warps: int
    chunk: int


def _env_int(name: str, power_of_two: bool = False) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        out = int(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if out < 1 or (power_of_two and out & (out - 1)):
        raise ValueError(f"{name} must be a{' power of two' if power_of_two else 'n integer'} >= 1, got {out}")
    return out


def tile_config(width: int, n_rows: int, device: torch.device, tile: int = 4096,
                values_per_warp: int = 512) -> Config:
    """Rows and warps for a ``? x width`` tile of about ``tile`` values."""
    pin_n, pin_w = _env_int("QGOFT_BLOCK_N", power_of_two=True), _env_int("QGOFT_NUM_WARPS")
    if device.type != "cuda":
        # the interpreter pays per operation, not per element: few large programs
        return Config(pin_n or max(1, min(64, 4096 // width)), pin_w or 1, width)
    block_n = pin_n or min(max(1, tile // width), 256, max(1, 1 << (n_rows - 1).bit_length()))
    num_warps = pin_w or min(16, max(4, 1 << ((block_n * width) // values_per_warp - 1).bit_length()))
    return Config(block_n, num_warps, width)


def _config(kind: str, d_pad: int, n_rows: int, device: torch.device, **tile) -> Config:
    pinned = _env_int("QGOFT_CHUNK", power_of_two=True)
    limit = pinned or (GPU_CHUNK[kind] if device.type == "cuda" else INTERPRETER_CHUNK)
    return tile_config(min(d_pad, limit), n_rows, device, **tile)


def forward_config(d_pad: int, n_rows: int, device: torch.device) -> Config:
    return _config("fwd", d_pad, n_rows, device, tile=4096, values_per_warp=512)


def backward_config(d_pad: int, n_rows: int, device: torch.device) -> Config:
    # the backward keeps many small per-stage tensors live: one row of a chunk per program,
    # spread over more threads (no spills on sm_90 in benchmarks/compile_report.py)
    return _config("bwd", d_pad, n_rows, device, tile=1024, values_per_warp=128)


def backward_groups(n_blocks: int, n_chunks: int, device: torch.device) -> int:
    """Row groups of the backward: each of ``groups x n_chunks`` programs walks one group."""
    pinned = _env_int("QGOFT_BWD_PROGRAMS")
    if pinned is None:
        pinned = -(-2 * _sm_count(device) // n_chunks) if device.type == "cuda" else 4
    return max(1, min(n_blocks, pinned))


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def acc_dtype(dtype: torch.dtype):
    """The kernels compute in float32, or float64 for float64 inputs."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def round_bf16(x: torch.Tensor) -> bool:
    """Round bf16 outputs explicitly: only needed where the interpreter runs the kernel."""
    return x.dtype == torch.bfloat16 and x.device.type != "cuda"


def new_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An output buffer the kernel overwrites completely (NaN-filled under ``QGOFT_POISON``)."""
    if os.environ.get("QGOFT_POISON", "0") not in ("", "0"):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)
