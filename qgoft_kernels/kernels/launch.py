"""Launch heuristics: vector width, groups per program, rows per block, warps and programs.

A program holds a ``[BLOCK_N, G, E]`` tile (``kernels/tree.py``): ``E`` columns per thread
vector (16 bytes of the input dtype), ``G = 2**lg`` vectors across the threads, so a chunk of
``G * E`` columns, and ``BLOCK_N`` rows that each thread holds as register repetitions. A
row longer than one chunk is split into ``2**(L - le - lg)`` chunks. Programs are
persistent: each walks a strided set of row blocks, so coefficients are loaded once per
program and (backward) the parameter gradients are summed in registers.

The environment variables below pin a configuration, for tests, for the interpreter and for
tuning runs (docs/environment.md):

- ``QGOFT_CHUNK``: chunk width in columns, a power of two (capped at the padded row);
- ``QGOFT_BLOCK_N``: rows per block, a power of two;
- ``QGOFT_NUM_WARPS``: warps per program;
- ``QGOFT_STAGES``: software-pipelining depth of the row loop on a GPU;
- ``QGOFT_PROGRAMS``: programs along the rows (the backward's partial gradients come one per
  such program, so this fixes the deterministic reduction order);
- ``QGOFT_POISON``: fill kernel outputs with NaN before the launch, so that an element a
  kernel fails to write shows up (tests and ``verify`` set it).
"""
from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .. import planning

#: The Triton release the kernels are compiled with, as ``(major, minor)``
TRITON = tuple(int(part) for part in triton.__version__.split(".")[:2])
#: Widest chunk on a GPU, in 16-byte vectors (one per thread): 8 warps for the forward. The
#: backward's ~230-250 registers per thread leave room for 8-9 warps per SM; its exchanges across
#: warps cost barriers, and triton 3.6 (the GPU machines') adds layout conversions around them,
#: so there it runs one-warp chunks (no exchange crosses a warp) and from 3.7 on two-warp chunks
#: (half the chunk roots). docs/tuning.md, v4, has the static model's figures behind both.
GPU_VECTORS = {"fwd": 256, "bwd": 64 if TRITON >= (3, 7) else 32}
#: Rows of up to this many vectors stay in one chunk on a GPU (no second launch for the roots).
SINGLE_CHUNK_VECTORS = 128
#: Widest chunk in the interpreter, in vectors: small, so that multi-chunk rows get tested on the CPU.
INTERPRETER_VECTORS = 8
#: Rows per block on a GPU: each thread keeps that many vectors of every input in flight.
GPU_BLOCK_N = {"fwd": 2, "bwd": 2}
#: Warps per multiprocessor the persistent programs are first planned for; the grid is then
#: sized from the compiled kernel's real occupancy (:func:`fit_grid`), so that one wave of
#: programs fills every SM
WARPS_PER_SM = {"fwd": 16, "bwd": 8}
#: Warp schedulers per multiprocessor (sm_80, sm_90)
SCHEDULERS = 4
#: Software-pipelining depth of the row loop on a GPU: loads stay in flight this many blocks ahead.
GPU_STAGES = {"fwd": 3, "bwd": 3}
#: The backward's gradient sum reads the partial rows in tiles of at most SUM_ROWS rows and
#: SUM_VALUES values per thread (4 warps). With more values, the compiler issues a tile's
#: loads in batches, each waiting for the one before (it reuses their registers): three
#: batches at 32 values, and with triton 3.6 already at 16. Fewer rows per tile mean more tiles
#: one after the other, so 3.7 and later take all rows in one tile where they can.
SUM_ROWS = 512 if TRITON >= (3, 7) else 32
SUM_VALUES = 16 if TRITON >= (3, 7) else 8


@dataclass(frozen=True)
class Config:
    le: int         # log2 of the vector width E
    lg: int         # log2 of the vectors (groups) per program G
    block_n: int    # rows per block
    num_warps: int
    programs: int   # programs along the rows
    n_iters: int    # row blocks each program walks ...
    n_full: int     # ... of which the first n_full are whole for every program
    stages: int     # software-pipelining depth of the row loop (loads in flight ahead)

    @property
    def chunk(self) -> int:
        return 1 << (self.le + self.lg)


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


def on_gpu(device: torch.device) -> bool:
    """A CUDA device, or a ``meta`` one while the static model plans launches (``planning.py``)."""
    return planning.as_gpu(device)


def config(kind: str, d_pad: int, n_rows: int, elem_size: int, device: torch.device, n_chunks=None) -> Config:
    """The launch configuration of ``kind`` (``"fwd"`` or ``"bwd"``) for rows of ``d_pad`` (a power of two).

    ``n_chunks`` maps the chunk count to the chunks actually launched (the ones that reach
    ``d``); it defaults to all of them.
    """
    gpu = on_gpu(device)
    log_d = d_pad.bit_length() - 1
    le = min(log_d, (16 // elem_size).bit_length() - 1)
    pinned_chunk = _env_int("QGOFT_CHUNK", power_of_two=True)
    if pinned_chunk is not None:
        width = min(pinned_chunk, d_pad)
        le = min(le, width.bit_length() - 1)
        lg = width.bit_length() - 1 - le
    else:
        vectors = GPU_VECTORS[kind] if gpu else INTERPRETER_VECTORS
        if gpu and (d_pad >> le) <= SINGLE_CHUNK_VECTORS:
            # short rows in one chunk: no roots launch
            vectors = max(vectors, d_pad >> le)
        lg = min(log_d - le, vectors.bit_length() - 1)
    groups = 1 << lg
    if gpu:
        # enough rows that every lane of a warp has a vector, and a few vectors in flight per thread
        block_n = max(GPU_BLOCK_N[kind], 32 // groups)
        num_warps = max(1, min(8, groups // 32))
    else:
        # the interpreter pays per operation, not per element: few large programs
        block_n = max(1, min(64, 1024 // (groups << le)))
        num_warps = 1
    block_n = _env_int("QGOFT_BLOCK_N", power_of_two=True) or block_n
    num_warps = _env_int("QGOFT_NUM_WARPS") or num_warps
    chunks = 1 << (log_d - le - lg)
    launched = chunks if n_chunks is None else n_chunks(chunks)
    n_blocks = -(-n_rows // block_n)
    programs = _env_int("QGOFT_PROGRAMS")
    if programs is None:
        per_sm = max(1, WARPS_PER_SM[kind] // num_warps)
        programs = -(-per_sm * sm_count(device) // launched) if gpu else 4
    programs = max(1, min(n_blocks, programs))
    stages = (_env_int("QGOFT_STAGES") or GPU_STAGES[kind]) if gpu else 1
    return Config(le, lg, block_n, num_warps, programs, -(-n_blocks // programs), (n_rows // block_n) // programs,
                  stages)


_RESIDENT: dict = {}


def resident(kernel, kwargs: dict, device: torch.device) -> int:
    """CTAs of ``kernel`` compiled for ``kwargs`` that one multiprocessor holds at once.

    On a GPU the kernel is compiled (``warmup``: the launch that follows finds it in the JIT's
    cache) and its registers and shared memory read from the loaded binary; while planning,
    the planner compiles it for sm_90. Cached per specialisation.
    """
    key = planning.launch_key(kernel, kwargs)
    if key not in _RESIDENT:
        if planning.active():
            regs, smem = planning.resources()(kernel, kwargs)
            limits = planning.SM90
        else:
            compiled = kernel.warmup(grid=(1,), **kwargs)
            compiled._init_handles()
            regs, smem = compiled.n_regs, compiled.metadata.shared
            props = torch.cuda.get_device_properties(device)
            limits = dict(planning.SM90, warps=getattr(props, "max_threads_per_multi_processor", 2048) // 32,
                          regs=getattr(props, "regs_per_multiprocessor", planning.SM90["regs"]),
                          smem=getattr(props, "shared_memory_per_multiprocessor", planning.SM90["smem"]))
        _RESIDENT[key] = max(1, planning.resident_ctas(regs, kwargs.get("num_warps", 4), smem, limits))
    return _RESIDENT[key]


def fit_grid(cfg: Config, kernel, kwargs: dict, n_rows: int, launched: int, device: torch.device) -> Config:
    """``cfg`` with its programs sized from ``kernel``'s real occupancy: ``launched`` chunks times the
    programs along the rows fill the resident slots of every multiprocessor once (no second
    wave), unless ``QGOFT_PROGRAMS`` pins them or the planner cannot compile (then ``cfg``)."""
    if not on_gpu(device) or _env_int("QGOFT_PROGRAMS") is not None or (planning.active()
                                                                         and planning.resources() is None):
        return cfg
    trial = dict(kwargs, n_full=cfg.n_full, n_iters=cfg.n_iters, num_warps=cfg.num_warps)
    per_sm = resident(kernel, trial, device)
    if cfg.num_warps == 1:
        # one-warp programs: the same number on each of the multiprocessor's schedulers (with equal
        # programs, a scheduler with one more would finish last); wider programs keep every slot,
        # which the static model prefers (docs/tuning.md, v4)
        per_sm = max(1, per_sm // SCHEDULERS * SCHEDULERS)
    slots = per_sm * sm_count(device)
    n_blocks = -(-n_rows // cfg.block_n)
    programs = max(1, min(n_blocks, slots // launched))
    return dataclasses.replace(cfg, programs=programs, n_iters=-(-n_blocks // programs),
                               n_full=(n_rows // cfg.block_n) // programs)


#: Registers per thread the mixed-batch kernel may use on a GPU: two 8-warp CTAs per multiprocessor.
#: Left to itself, the compiler gave some variants 151-173 registers (triton 3.9: d = 4096 quasi with
#: scale, d = 11008 quasi), one CTA per multiprocessor and half the warps; capped, no variant of
#: docs/tuning.md's "Mixed batches" spills more than the forward does.
MIXED_MAX_REGISTERS = 128


#: Rows per block of the mixed-batch kernel on a GPU (unless ``QGOFT_BLOCK_N`` pins it): twice the
#: forward's. Its row loop waits longer per block than the forward's (every block's rows gathered
#: through ``order``, masked), and its programs are short; four rows a block halve the blocks and so
#: the time one program spends waiting (docs/tuning.md, "Mixed batches").
MIXED_BLOCK_N = 4


def mixed_config(d_pad: int, n_rows: int, elem_size: int, device: torch.device) -> Config:
    """The forward's :func:`config` for a mixed batch: on a GPU, at least ``MIXED_BLOCK_N`` rows per
    block unless ``QGOFT_BLOCK_N`` pins them."""
    cfg = config("fwd", d_pad, n_rows, elem_size, device)
    if on_gpu(device) and _env_int("QGOFT_BLOCK_N", power_of_two=True) is None:
        cfg = dataclasses.replace(cfg, block_n=max(cfg.block_n, MIXED_BLOCK_N))
    return cfg


def mixed_programs(kernel, kwargs: dict, n_slots: int, launched: int, cfg: Config, device: torch.device) -> int:
    """Persistent programs along the rows of a mixed batch's launch (``kwargs``: its arguments,
    ``num_warps`` included): ``launched`` chunks times them fill every multiprocessor's resident
    slots once, from the compiled kernel's real occupancy, and none gets less than one of the
    ``n_slots`` row blocks. ``QGOFT_PROGRAMS`` pins them; off a GPU (the interpreter), ``cfg``'s."""
    pinned = _env_int("QGOFT_PROGRAMS")
    if pinned is not None:
        return max(1, min(n_slots, pinned))
    if not on_gpu(device) or (planning.active() and planning.resources() is None):
        return max(1, min(n_slots, cfg.programs))
    per_sm = resident(kernel, kwargs, device)
    if cfg.num_warps == 1:
        # the same number on each of the multiprocessor's schedulers, as fit_grid does
        per_sm = max(1, per_sm // SCHEDULERS * SCHEDULERS)
    return max(1, min(n_slots, per_sm * sm_count(device) // launched))


def roots_config(n_rows: int, K: int, device: torch.device):
    """``(block_n, programs, n_iters, num_warps)`` for a kernel on the ``[rows, K]`` chunk roots.

    On a GPU its tile holds up to 2048 roots over 8 warps (8 per thread; more spill with
    triton 3.6), and up to four programs per multiprocessor share the row blocks (fewer where
    fewer fit: :func:`fit_roots`).
    """
    gpu = on_gpu(device)
    block_n = max(1, min(256, 2048 // K)) if gpu else max(1, min(64, 1024 // K))
    n_blocks = -(-n_rows // block_n)
    programs = max(1, min(n_blocks, 4 * sm_count(device) if gpu else 4))
    return block_n, programs, -(-n_blocks // programs), 8 if gpu else 1


def fit_roots(rcfg: tuple, kernel, kwargs: dict, n_rows: int, device: torch.device) -> tuple:
    """:func:`roots_config`'s ``rcfg`` for ``kernel`` (launched with ``kwargs`` and the config's
    rows per block and warps), with no more programs than every multiprocessor holds at once."""
    block_n, programs, n_iters, num_warps = rcfg
    if not on_gpu(device) or (planning.active() and planning.resources() is None):
        return rcfg
    per_sm = resident(kernel, dict(kwargs, BLOCK_N=block_n, n_iters=n_iters, num_warps=num_warps), device)
    programs = max(1, min(programs, per_sm * sm_count(device)))
    return block_n, programs, -(-(-(-n_rows // block_n)) // programs), num_warps


def sm_count(device: torch.device) -> int:
    if planning.active():
        return planning.sms()
    return _sm_count(device)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def acc_dtype(dtype: torch.dtype):
    """The kernels compute in float32, or float64 for float64 inputs."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def wide_words(x: torch.Tensor) -> bool:
    """Whether a kernel may read 16-bit rows of ``x`` as 32-bit words at even columns: every row
    starts 4-byte aligned and has an even length, so no word reaches past it (on a GPU the words
    then take the asynchronous-copy path, which copies 4 bytes or more)."""
    return x.element_size() == 2 and x.stride(0) % 2 == 0 and x.shape[-1] % 2 == 0 and x.data_ptr() % 4 == 0


def round_bf16(x: torch.Tensor) -> bool:
    """Round bf16 outputs explicitly: only needed where the interpreter runs the kernel."""
    return x.dtype == torch.bfloat16 and not on_gpu(x.device)


def new_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An output buffer the kernel overwrites completely (NaN-filled under ``QGOFT_POISON``)."""
    if os.environ.get("QGOFT_POISON", "0") not in ("", "0"):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)
