"""The static cost model: the kernels' compiled sm_90 code, read without a GPU.

    python -m benchmarks.sass                      # the default matrix -> results/sass-sm90.json
    python -m benchmarks.sass --dims 1024 --ops forward --blocks quasi --out /tmp/s.json

For every op (``forward`` = ``x @ R``, ``forward_t`` = ``x @ R^T``, ``backward`` = ``dx`` and
every parameter gradient, ``merge`` = ``GivensLinear.merged_linear`` end to end) at the
benchmark shape, it runs the package's own launch path on ``meta`` tensors while pretending
to be an H200 (``kernels.launch.planning``). That records every launch the op makes: each
Triton kernel with the exact arguments the launcher passes (so the compile below gets the
JIT's own specialisation: 16-byte-aligned pointers, integers divisible by 16) and each
PyTorch op (a reduction, a ``cos``, an allocation's fill). Each Triton kernel is compiled
for sm_90 by Triton's compiler and disassembled with the ``cuobjdump`` in the triton wheel;
from the SASS it counts, per row: warp-instructions, barriers, shared-memory accesses, and
the global-load bytes a thread keeps in flight; from the resource usage: registers, spills,
shared memory and so resident CTAs per SM.

A launch's time is the largest of three bounds (docs/tuning.md says why and what is left
out), plus a fixed cost per launch:

- memory: its HBM bytes (counted per kernel from what it must read and write) at
  ``COPY_BW``, the copy bandwidth ``torch.clone`` reaches;
- issue: its warp-instructions at 4 per clock on each of ``SMS`` multiprocessors;
- latency: its HBM reads at the rate Little's law allows with the bytes every SM keeps in
  flight, ``SMS * in_flight / LATENCY``.

``mixed`` (only with ``--ops mixed``) is a mixed batch, ``x @ R_a`` with each row's own adapter
``a`` (``qgoft_kernels.mixed``): ``--adapters`` stacked, the rows in runs of ``--run-rows`` of
one adapter, adapters given to the runs in turn or at random (``--assign``); its rows carry
``adapters``, ``run_rows`` and ``assign`` (docs/tuning.md, "Mixed batches").

``predicted_over_clone`` is the op's time over ``torch.clone`` of the same tensor, modelled
the same way. Two reference points keep the model honest: a plain Triton copy kernel
(``reference: copy``), which must come out near 1.0x, and the v2 kernels of commit
``V2_COMMIT`` (``reference: v2``), read from git.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import dataclasses
import datetime
import importlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from unittest import mock

import torch
import triton
import triton.language as tl
from torch.utils._python_dispatch import TorchDispatchMode

# the JIT default of the triton versions in use (3.6 on the GPU machine, 3.9 here); said once, not per compile
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import sm90  # noqa: E402
from benchmarks.environ import scoped  # noqa: E402
from qgoft_kernels import ops  # noqa: E402
from qgoft_kernels.planning import launch_key, planning  # noqa: E402
from qgoft_kernels.schedule import num_pairs  # noqa: E402

#: multiprocessors of both cards (H100 SXM and H200): the launchers plan for this many
SMS = 132
TARGET = triton.backends.compiler.GPUTarget("cuda", 90, 32)
V2_COMMIT = "e3e8bcf"
#: the v3 kernels, the "before" of v4 (docs/tuning.md)
V3_COMMIT = "1e680c0"
OPS = ("forward", "forward_t", "backward", "merge")
#: ``mixed``: a mixed batch (``x @ R_a``, each row its own adapter), asked for by name (``--ops mixed``)
ALL_OPS = OPS + ("mixed",)
#: the mixed batches priced: adapters, rows per run of one adapter, how adapters are given to the runs
#: (random first: the row benchmarks/gpu_quick.py takes for its batch, whose adapters are drawn at random)
MIXED_ADAPTERS = 64
RUN_ROWS = (16, 32, 1)
ASSIGN = ("random", "roundrobin")
DIMS = (1024, 2048, 4096, 8192, 11008, 16384)
#: ``(block, scale)`` variants by name
VARIANTS = {"quasi+scale": ("quasi", True), "quasi": ("quasi", False), "givens+scale": ("givens", True),
            "givens": ("givens", False)}
DTYPES = ("bfloat16", "float16")
DEFAULT_OUT = os.path.join(ROOT, "benchmarks", "results", "sass-sm90.json")


# ------------------------------------------------------------------------------------------
# capturing what an op launches

@dataclass
class Launch:
    """One launch of an op: a Triton kernel (``fn``, ``grid``, ``kwargs``) or a PyTorch op."""
    name: str
    fn: object = None
    grid: tuple = ()
    kwargs: dict = field(default_factory=dict)
    torch_bytes: int = 0
    info: dict = field(default_factory=dict)


_VIEWS = {"view", "_unsafe_view", "reshape", "as_strided", "t", "transpose", "select", "slice", "expand", "alias",
          "detach", "unsqueeze", "squeeze", "permute", "split", "unbind", "empty", "empty_strided", "empty_like",
          "new_empty",
          "_to_copy_noop", "lift_fresh", "_reshape_alias", "view_as_real", "split_with_sizes", "narrow"}


#: the package's custom ops and the functions that implement them (same arguments)
_CUSTOM_OPS = {torch.ops.qgoft.rotate.default: ops.launch_forward,
               torch.ops.qgoft.rotate_backward.default: ops.launch_backward}


class _Recorder(TorchDispatchMode):
    """Records every PyTorch op that would launch a kernel, with the bytes it reads and writes."""

    def __init__(self, launches):
        super().__init__()
        self.launches = launches

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _CUSTOM_OPS:
            # the package's own ops: run their implementation, whose launches get recorded
            # (on meta tensors the dispatcher would pick their shape-only fake)
            return _CUSTOM_OPS[func](*args, **(kwargs or {}))
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name not in _VIEWS and not (name == "_to_copy" and _same_dtype(args, out)):
            tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
            self.launches.append(Launch(f"torch.{name}", torch_bytes=sum(t.numel() * t.element_size()
                                                                          for t in tensors)))
        return out


def _same_dtype(args, out):
    return isinstance(out, torch.Tensor) and args and isinstance(args[0], torch.Tensor) and args[0].dtype == out.dtype


@contextlib.contextmanager
def capture(launches):
    """Record the launches made inside: Triton kernels are not run, PyTorch ops run on ``meta``."""
    jit = triton.runtime.jit.JITFunction
    original = jit.run

    def run(self, *args, grid, warmup, **kwargs):
        assert not args, f"{self.fn.__name__}: launch it with keyword arguments"
        launches.append(Launch(self.fn.__name__, self, tuple(grid), dict(kwargs)))

    jit.run = run
    try:
        with planning(SMS, resources), _Recorder(launches):
            yield
    finally:
        jit.run = original


_RESOURCES: dict = {}


def resources(fn, kwargs):
    """``(registers, shared bytes)`` of ``fn`` compiled for sm_90 with these arguments (the
    launchers size their grids from it while planning)."""
    key = launch_key(fn, kwargs)
    if key not in _RESOURCES:
        sass = read_sass(compile_kernel(fn, kwargs))
        _RESOURCES[key] = (sass.regs, sass.smem)
    return _RESOURCES[key]


def _meta_inputs(op, d, rows, dtype, block, scale):
    x = torch.empty(rows, d, dtype=dtype, device="meta")
    n = num_pairs(d)
    params = torch.empty((n,) if block == "givens" else (n, 2, 2), dtype=torch.float32, device="meta")
    s = torch.empty(d, dtype=torch.float32, device="meta") if scale else None
    return x, params, s


def mixed_index(rows, adapters, run_rows, assign="roundrobin", seed=0):
    """A mixed batch's adapter per row: the rows come in runs of ``run_rows``, each run of one
    adapter, assigned to the runs in turn (``"roundrobin"``: every adapter gets the same number
    of rows, within a run) or at random (``"random"``, a fixed ``seed``)."""
    runs = -(-rows // run_rows)
    if assign == "roundrobin":
        picks = torch.arange(runs) % adapters
    elif assign == "random":
        picks = torch.randint(0, adapters, (runs,), generator=torch.Generator().manual_seed(seed))
    else:
        raise ValueError(assign)
    return picks.repeat_interleave(run_rows)[:rows]


def _mixed_batch(d, rows, block, scale, mixed):
    """The stacked ``meta`` parameters of ``mixed["adapters"]`` adapters and the batch (grouped
    once per batch, for every layer: its sorting is not part of a layer's launch), and the
    tile table the kernel's grid walks, on the CPU: ``(first, rows, adapter)`` per tile."""
    from qgoft_kernels import mixed as mx

    A = mixed["adapters"]
    index = mixed_index(rows, A, mixed["run_rows"], mixed.get("assign", "roundrobin"), mixed.get("seed", 0))
    n = num_pairs(d)
    params = torch.empty((A, n) if block == "givens" else (A, n, 2, 2), dtype=torch.float32, device="meta")
    s = torch.empty(A, d, dtype=torch.float32, device="meta") if scale else None
    batch = mx.MixedBatch(index, A, device="meta")
    # what the launcher asks for while planning (a GPU's tile), made here so that it is not recorded
    batch.kernel_order()
    batch.tiles(mx.TILE_ROWS)
    tiles = mx.MixedBatch(index, A).tiles(mx.TILE_ROWS).tolist()
    return params, s, batch, tiles


def record(op, d, rows, dtype, block, scale, env=None, kernels=None, mixed=None):
    """The launches of ``op`` at ``rows x d`` (``merge``: a ``rows x d`` weight).

    ``kernels`` replaces the package's kernels module (an older version's, rebuilt from git).
    ``mixed`` (op ``"mixed"``: a mixed batch, ``x @ R_a`` row by row): ``adapters``,
    ``run_rows``, ``assign`` and ``seed`` of :func:`mixed_index`; the mixed kernel's launch
    gets the tile table in its ``info["tiles"]``.
    """
    import qgoft_kernels as qk

    launches = []
    x, params, s = _meta_inputs(op, d, rows, dtype, block, scale)
    if op == "mixed":
        params, s, batch, tiles = _mixed_batch(d, rows, block, scale, mixed)
    swap = mock.patch.object(ops, "_kernels", lambda: kernels) if kernels is not None else contextlib.nullcontext()
    # the compiled path with its runtime specialisation: no interpreter, no poisoning fills
    with scoped({"QGOFT_POISON": None, "TRITON_INTERPRET": None, **(env or {})}), swap, capture(launches):
        if op == "forward":
            ops.launch_forward(x, params, s, block, "tree", False)
        elif op == "forward_t":
            ops.launch_forward(x, params, s, block, "tree", True)
        elif op == "backward":
            ops.launch_backward(x, x, params, s, block, "tree", False, True, True, s is not None)
        elif op == "merge":
            linear = torch.nn.Linear(d, rows, bias=True, device="meta", dtype=dtype)
            layer = qk.GivensLinear.from_linear(linear, block=block, scale=scale)
            launches.clear()  # building the layer is not part of the merge
            layer.merged_linear()
        elif op == "mixed":
            qk.givens_rotate(x, params, block=block, scale=s, adapter_index=batch)
        else:
            raise ValueError(op)
    for launch in launches:
        if launch.name == "_givens_fwd_mixed_kernel":
            assert tuple(launch.kwargs["tiles"].shape) == (len(tiles), 3), "the launch's tiles are not the batch's"
            launch.info["tiles"] = tiles
    return launches


# ------------------------------------------------------------------------------------------
# compiling and reading the SASS

def compile_kernel(fn, kwargs):
    """Compile ``fn`` for sm_90 with the specialisation the JIT would give these arguments."""
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(TARGET)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    options = {k: kwargs[k] for k in ("num_warps", "num_stages", "maxnreg") if k in kwargs}
    args = {k: v for k, v in kwargs.items() if k not in options}
    bound, specialization, opts = binder(**args, **options)
    opts, signature, constexprs, attrs = fn._pack_args(backend, options, bound, specialization, opts)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=TARGET, options=opts.__dict__)


def _cuobjdump(cubin: bytes, flag: str) -> str:
    import triton.backends.nvidia as nvidia

    tool = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as fh:
            fh.write(cubin)
        return subprocess.run([tool, flag, path], capture_output=True, text=True, check=True).stdout


_LINE = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
#: the second 64-bit word of an instruction, on the line after it: its scheduling fields
_CONTROL = re.compile(r"^\s+/\*\s*0x([0-9a-f]{16})\s*\*/\s*$")
_REG = re.compile(r"\bR(\d+)(\.64)?\b")
_opcode, _width = sm90.opcode, sm90.width


@dataclass
class Sass:
    instrs: list      # (address, text)
    loops: list       # (start, end) of every backward branch but the final trap loop
    regs: int
    stack: int
    smem: int
    words: list = None  # each instruction's second encoding word (its scheduling fields), when read

    def multiplicity(self, trips):
        """Times each instruction runs per program, the ``i``-th loop running ``trips[i]`` times."""
        out = []
        for addr, _ in self.instrs:
            m = 1
            for (start, end), n in zip(self.loops, trips):
                if start <= addr <= end:
                    m *= n
            out.append(m)
        return out

    def scheduled(self):
        """The instructions with their scheduling fields, for :func:`sm90.timeline`."""
        words = self.words or [None] * len(self.instrs)
        return [sm90.make_instr(a, t, w) for (a, t), w in zip(self.instrs, words)]

    def in_flight_bytes(self):
        """Peak global-load bytes one thread has issued and not yet waited for.

        Walks the loop body twice (loads issued for a later iteration stay in flight across
        the back edge) or the whole program. A plain load is waited for at the first use of
        its registers; an asynchronous copy (``LDGSTS``, what Triton's pipeliner emits)
        joins a group at ``LDGDEPBAR`` and is waited for at the ``DEPBAR.LE SB0, n`` that
        leaves fewer than its group's age outstanding.
        """
        if self.loops:
            start, end = self.loops[0]
            body = [t for a, t in self.instrs if start <= a <= end] * 2
        else:
            body = [t for _, t in self.instrs]
        pending, open_group, groups, peak = {}, 0, [], 0
        for i, text in enumerate(body):
            op = _opcode(text)
            operands = text[text.index(op) + len(op):]
            if op.startswith("LDGSTS"):
                open_group += _width(op)
            elif op.startswith("LDGDEPBAR"):
                groups.append(open_group)
                open_group = 0
            elif op.startswith("DEPBAR"):
                keep = re.search(r"SB0,\s*0x([0-9a-f]+)", operands)
                keep = int(keep.group(1), 16) if keep else 0
                groups = groups[len(groups) - keep:] if keep else []
            else:
                regs = _registers(operands)
                sources = regs if op.startswith(("ST", "RED", "ATOM")) else regs[1:]
                for key in [k for k, (dest, _) in pending.items() if dest & set(sources)]:
                    del pending[key]
                if op.startswith("LDG"):
                    first = regs[0] if regs else 0
                    pending[i] = (set(range(first, first + max(1, _width(op) // 4))), _width(op))
            peak = max(peak, sum(b for _, b in pending.values()) + open_group + sum(groups))
        return peak


def _registers(operands):
    out = []
    for num, wide in _REG.findall(operands):
        out.append(int(num))
        if wide:
            out.append(int(num) + 1)
    return out


#: a conditional branch (``@P0 BRA 0x...``, or with a second predicate: ``@!P0 BRA P2, 0x...``)
_BRANCH = re.compile(r"^@!?P\d BRA (?:!?U?P[T0-9]+,\s*)?(?:`\()?0x([0-9a-f]+)")


def _cold(instrs):
    """The address ranges of libdevice's huge-argument paths, assumed never taken: a rotation
    angle that large (``|theta| >= 105615``) does not occur. libdevice's single-precision sine
    and cosine reduce such arguments on a slow path (Payne-Hanek: a table in local memory, a
    read-only table of 2/pi, a double-precision product) that a conditional branch jumps over;
    a forward branch whose skipped code reads through the read-only path (``LDG.E.CONSTANT``,
    which the kernels do not use otherwise) or converts a 64-bit integer to double and
    multiplies in double precision (they compute in single precision) is that path. A branch
    over code that libdevice's path has none of (an unconditional ``EXIT``, a barrier, a
    shuffle, a global store or asynchronous copy) is not: it skips a whole part of the program,
    slow paths and all (the mixed kernel's segments and its branch between the rows of an
    adapter and rows without one)."""
    ranges = []
    for i, (addr, text) in enumerate(instrs):
        m = _BRANCH.match(text)
        if not m or int(m.group(1), 16) <= addr:
            continue
        end = int(m.group(1), 16)
        skipped = [_opcode(t) for a, t in instrs[i + 1:] if a < end]
        if any(op == "EXIT" or op.startswith(("BAR", "SHFL", "STG", "LDGSTS")) for op in skipped):
            continue
        if any(op.startswith("LDG.E.CONSTANT") for op in skipped) or (
                any(op.startswith("I2F.F64") for op in skipped) and any(op.startswith("DMUL") for op in skipped)):
            ranges.append((addr, end))
    return ranges


def parse_sass(text: str):
    """``(instrs, words, loops)`` from ``cuobjdump --dump-sass`` output, without the code of
    libdevice's huge-argument paths (:func:`_cold`)."""
    instrs, words = [], []
    for line in text.splitlines():
        m = _LINE.match(line)
        if m:
            instrs.append((int(m.group(1), 16), m.group(2)))
            words.append(None)
            continue
        c = _CONTROL.match(line)
        if c and instrs and words[-1] is None:
            words[-1] = int(c.group(1), 16)
    cold = _cold(instrs)
    hot = [i for i, (addr, _) in enumerate(instrs) if not any(start < addr < end for start, end in cold)]
    instrs, words = [instrs[i] for i in hot], [words[i] for i in hot]
    loops = []
    for addr, text in instrs:
        target = re.search(r"BRA\s+(?:!?U?P[T0-9]+,\s*)?(?:`\()?0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < addr:
            loops.append((int(target.group(1), 16), addr))
    return instrs, words, loops


def read_sass(compiled) -> Sass:
    cubin = compiled.asm["cubin"]
    usage = _cuobjdump(cubin, "--dump-resource-usage")
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", usage)
    instrs, words, loops = parse_sass(_cuobjdump(cubin, "--dump-sass"))
    if any(w is None for w in words):
        raise RuntimeError("cuobjdump printed an instruction without its scheduling word")
    smem = max(int(found.group(3)), compiled.metadata.shared)
    return Sass(instrs, loops, int(found.group(1)), int(found.group(2)), smem, words)


ctas_per_sm = sm90.ctas_per_sm


# ------------------------------------------------------------------------------------------
# what each kernel must move through HBM (unique bytes; coefficients come from L2)

def _nbytes(t):
    return t.numel() * t.element_size()


def _hbm_bytes(launch: Launch) -> tuple[int, int]:
    """``(read, written)`` HBM bytes of a Triton launch, from its arguments."""
    a = launch.kwargs
    name = launch.name
    if "hbm" in launch.info:
        # a kernel that states its own traffic (the model's tests)
        return launch.info["hbm"]
    if name == "_copy_kernel":
        return _nbytes(a["x"]), _nbytes(a["y"])
    if name == "_givens_angles_kernel":
        return _nbytes(a["theta"]), _nbytes(a["coefs"])
    if name == "_givens_grad_sum_kernel":
        # each column summed over the rows that wrote it: the chunk launch's, or (the coarse
        # stages' slots) the roots launch's; masked-off rows are not read
        elem, D = a["partials"].element_size(), 1 << a["L"]
        coarse = (a["ds_start"] // D) * (1 << (a["L"] - a["R0"])) if "R0" in a else 0
        if "n_main" in a:
            read = (a["n_main"] * (a["stride_part"] - coarse) + a["n_coarse"] * coarse) * elem
        else:
            # v3: every partial row, all columns
            read = a["n_parts"] * a["stride_part"] * elem
        return read, (_nbytes(a["dparams"]) if a["HAS_DPARAMS"] else 0) + (_nbytes(a["dscale"]) if a["HAS_DSCALE"]
                                                                            else 0)
    if name == "_givens_fwd_mixed_kernel":
        return _mixed_bytes(launch)
    rows, d = a["n_rows"], a["d"]
    elem = next(a[k] for k in ("x", "y", "dx") if k in a).element_size()
    if name in ("_givens_fwd_kernel",):
        T, K = a["TRANSPOSE"], 1 << (a["L"] - a["LE"] - a["LG"])
        roots = rows * K * 4 if T and K > 1 else 0
        return rows * d * elem, rows * d * elem + roots
    if name == "_givens_fwd_roots_kernel":
        K = 1 << (a["L"] - a["R0"])
        # the roots' fp32 carries; each root of y rewrites one 32-byte sector (read, then written)
        return rows * K * 4 + rows * a["n_chunks"] * 32, rows * a["n_chunks"] * 32
    if name == "_givens_bwd_kernel":
        K = 1 << (a["L"] - a["LE"] - a["LG"])
        part = _nbytes(a["partials"])
        tops = rows * K * 4 if K > 1 and "tops" in a else 0
        roots = rows * K * 4 if K > 1 else 0
        return 2 * rows * d * elem + tops, (rows * d * elem if a["HAS_DX"] else 0) + roots + part
    if name == "_givens_tops_kernel":
        K = 1 << (a["L"] - a["R0"])
        # each chunk root of x (or dy) is a 32-byte sector read for one value; three fp32 out
        return rows * K * 32, rows * K * 12
    if name == "_givens_bwd_roots_kernel":
        K = 1 << (a["L"] - a["R0"])
        # the a carries, the b operands from the tops launch; each root of dx rewrites one 32-byte
        # sector (read, then written); v3's read the b side's chunk roots in x (a sector each)
        dx = rows * a["n_chunks"] * 32 if a["HAS_DX"] and not a["TRANSPOSE"] else 0
        b_side = rows * K * 8 if "tops" in a else rows * a["n_chunks"] * 32
        return rows * K * 4 + b_side + dx, dx
    # the v2 kernels (reference)
    if name == "_givens_fwd_kernel_v2":
        return rows * d * elem, rows * d * elem
    if name == "_givens_bwd_kernel_v2":
        K = launch.info["K"]
        return 2 * rows * d * elem, rows * d * elem + (rows * K * 4 if K > 1 else 0) + _nbytes(a["dparams"])
    if name == "_givens_bwd_roots_kernel_v2":
        K = launch.info["K"]
        return rows * K * 4 + rows * K * 32, rows * K * 32
    raise KeyError(f"no HBM byte count for kernel {name}")


def _mixed_bytes(launch: Launch) -> tuple[int, int]:
    """``(read, written)`` HBM bytes of the mixed kernel: every row of ``x`` read and written once
    (the tiles partition the rows), ``order`` and the tile table once, and each adapter in use's
    coefficients (and scale) once. Every program reads its adapters' coefficients again, once
    per segment and chunk: those reads are assumed to be L2 hits (64 adapters' blocks at
    d = 4096 are 4.2 MB, in 50 MB of L2), priced as L2 latency in each program's path, not as
    HBM bytes (:func:`mixed_l2_bytes` counts them)."""
    a = launch.kwargs
    rows, d = a["x"].shape
    tiles = launch.info["tiles"]
    used = len({adapter for _, _, adapter in tiles if adapter >= 0})
    coefs = used * a["coefs_per_adapter"] * a["coefs"].element_size()
    scale = used * d * a["scale"].element_size() if a["HAS_SCALE"] else 0
    data = rows * d * a["x"].element_size()
    return data + _nbytes(a["order"]) + _nbytes(a["tiles"]) + coefs + scale, data


def mixed_l2_bytes(launch: Launch) -> int:
    """Coefficient (and scale) bytes the mixed kernel's programs read in all: each program its
    segments' adapters' share for its chunk, once per segment (about; :func:`mixed_segments`)."""
    a = launch.kwargs
    d = a["x"].shape[1]
    chunks = launch.grid[1]
    segments = sum(len(p) for p in mixed_segments(launch))
    coefs = a["coefs_per_adapter"] * a["coefs"].element_size()
    scale = d * a["scale"].element_size() if a["HAS_SCALE"] else 0
    return segments * chunks * ((coefs + scale) // chunks)


# ------------------------------------------------------------------------------------------
# the model

#: launches whose wide loads read only what the op's launch before them wrote, a few MB at most:
#: the partial gradient rows and the chunk roots' carries, L2 hits (50 MB of L2 on both cards; the
#: backward roots kernel's other loads, 2-byte gathers of x, are priced as L2 hits anyway)
L2_RESIDENT = {"_givens_grad_sum_kernel", "_givens_fwd_roots_kernel", "_givens_bwd_roots_kernel"}


def kernel_row(launch: Launch, rows: int, cache: dict) -> dict:
    """Static counts, one warp's path and, per card and constant set, the time of one Triton launch.

    A launch whose programs differ (the mixed kernel's: segments of different lengths and
    numbers, :func:`_classes`) counts its mean program's instructions (each kind's weighted by
    its share of the programs); its path is its slowest program's when all run in one wave, the
    mean program's over several."""
    key = launch_key(launch.fn, launch.kwargs)
    if key not in cache:
        cache[key] = read_sass(compile_kernel(launch.fn, launch.kwargs))
    sass = cache[key]
    warps = launch.kwargs.get("num_warps", 4)
    programs = math.prod(launch.grid)
    classes = _classes(launch, sass)
    per_program = collections.Counter()
    issue = sm90.IssueCounts()
    resident = launch.name in L2_RESIDENT
    by_class = []
    for count, trips, code in classes:
        share = count / programs if len(classes) > 1 else 1
        mult = code.multiplicity(trips)
        for (_, text), m in zip(code.instrs, mult):
            m = m * share if share != 1 else m
            op = _opcode(text)
            issue.add(op, m)
            per_program["all"] += m
            per_program["bar"] += m * op.startswith("BAR")
            per_program["smem"] += m * op.startswith(("LDS", "STS", "LDSM", "STSM"))
            per_program["shfl"] += m * op.startswith("SHFL")
        instrs = code.scheduled()
        by_class.append((share, trips, {k.name: sm90.timeline(instrs, code.loops, trips, k, resident)
                                        for k in sm90.SETS}))
    ctas = ctas_per_sm(sass.regs, warps, sass.smem)
    if len(by_class) == 1:
        paths = by_class[0][2]
    elif programs <= max(1, ctas) * SMS:
        # one wave: the launch waits for its slowest program
        paths = {k.name: max((c[k.name] for _, _, c in by_class), key=lambda p: p.cycles) for k in sm90.SETS}
    else:
        # several waves: a slot that finishes early takes the next program, so the mean program
        main = max(by_class, key=lambda c: c[0])[2]
        paths = {name: sm90.Path(cycles=sum(sh * c[name].cycles for sh, _, c in by_class),
                                 iteration=main[name].iteration,
                                 round_trips=max(c[name].round_trips for _, _, c in by_class),
                                 iterations=main[name].iterations,
                                 first_stream=sum(sh * c[name].first_stream for sh, _, c in by_class))
                 for name in main}
    # the bytes in flight of the main loop (the mixed kernel's first row loop: its first loop is a scan)
    walked = _part(sass, lambda a: True)
    if launch.name == "_givens_fwd_mixed_kernel":
        walked.loops = [loop for loop, kind in zip(sass.loops, _loop_kinds(sass)) if kind == "rows"][:1]
    in_flight = walked.in_flight_bytes() * 32 * warps * max(1, min(ctas, -(-programs // SMS)))
    read, written = _hbm_bytes(launch)
    cards = {c.name: {k.name: sm90.launch_time(paths[k.name], issue, programs, warps, ctas, read + written, c, k)
                      for k in c.sets} for c in sm90.CARDS}
    widths = collections.Counter(_opcode(t) for _, t in sass.instrs if _opcode(t).startswith(("LDG", "STG")))
    out = {
        "launch": launch.name, "grid": list(launch.grid), "num_warps": warps,
        "regs": sass.regs, "spill_bytes": sass.stack, "smem_bytes": sass.smem,
        "ctas_per_sm": ctas, "warps_per_sm": ctas * warps,
        "warp_instructions_per_row": per_program["all"] * warps * programs / rows,
        "barriers_per_row": per_program["bar"] * programs / rows,
        "smem_accesses_per_row": per_program["smem"] * warps * programs / rows,
        "shuffles_per_row": per_program["shfl"] * warps * programs / rows,
        "global_access_widths": dict(sorted(widths.items())),
        "in_flight_bytes_per_sm": in_flight,
        "hbm_bytes_per_row": (read + written) / rows,
        "round_trips": paths["pess"].round_trips,
        "path": {name: {"cycles": p.cycles, "iteration_cycles": p.iteration, "iterations": p.iterations,
                        "first_stream_cycles": p.first_stream}
                 for name, p in paths.items()},
        "issue": {"instructions_per_warp": issue.instructions, "pipes": dict(issue.pipes), "mio_cycles": issue.mio},
        "cards": cards,
    }
    if len(by_class) > 1 or launch.name == "_givens_fwd_mixed_kernel":
        out["program_kinds"] = len(by_class)
    if launch.name == "_givens_fwd_mixed_kernel":
        segments = [len(p) for p in mixed_segments(launch)]
        out["segments_per_program"] = {"mean": sum(segments) / len(segments), "max": max(segments)}
        out["l2_coef_bytes_per_row"] = mixed_l2_bytes(launch) / rows
    return out


def _classes(launch: Launch, sass: Sass) -> list:
    """The launch's programs by what they run: ``[(programs, trips, code)]``, ``code`` the
    instructions they walk (a :class:`Sass`), ``trips`` its loops' trip counts."""
    if launch.name == "_givens_fwd_mixed_kernel":
        return _mixed_classes(launch, sass)
    return [(math.prod(launch.grid), _trips(launch, sass), sass)]


def _part(sass: Sass, keep) -> Sass:
    """``sass`` with only the instructions at the addresses ``keep(address)`` holds, and their loops."""
    idx = [i for i, (a, _) in enumerate(sass.instrs) if keep(a)]
    words = [sass.words[i] for i in idx] if sass.words else None
    loops = [(s, e) for s, e in sass.loops if keep(s) and keep(e)]
    return Sass([sass.instrs[i] for i in idx], loops, sass.regs, sass.stack, sass.smem, words)


def mixed_segments(launch: Launch) -> list:
    """Each program's segments as the mixed kernel walks them: ``(adapter, slots, scan loads)``
    per run of one adapter's tiles in the program's share of the slots (the kernel's own
    arithmetic, on the tile table the launch was recorded with)."""
    if "segments" not in launch.info:
        blocks, tiles = launch.kwargs["TILE_BLOCKS"], launch.info["tiles"]
        n_slots, programs = len(tiles) * blocks, launch.grid[0]
        out = []
        for i in range(programs):
            lo, hi = i * n_slots // programs, (i + 1) * n_slots // programs
            segments, s = [], lo
            while s < hi:
                t, last = s // blocks, (hi - 1) // blocks
                adapter, end, scans = tiles[t][2], t + 1, 0
                while end <= last:
                    scans += 1
                    if tiles[end][2] != adapter:
                        break
                    end += 1
                segments.append((adapter, min(hi, end * blocks) - s, scans))
                s = min(hi, end * blocks)
            out.append(tuple(segments))
        launch.info["segments"] = out
    return launch.info["segments"]


def _loop_kinds(sass: Sass) -> list:
    """Each loop's kind: ``"outer"`` (it holds another loop), ``"rows"`` (shuffles and stores: a
    row loop), ``"copy"`` (stores, no shuffle), ``"scan"`` (neither)."""
    kinds = []
    for start, end in sass.loops:
        if any(start <= s and e <= end and (s, e) != (start, end) for s, e in sass.loops):
            kinds.append("outer")
            continue
        ops = [_opcode(t) for a, t in sass.instrs if start <= a <= end]
        stores, shuffles = any(o.startswith("STG") for o in ops), any(o.startswith("SHFL") for o in ops)
        kinds.append("rows" if stores and shuffles else "copy" if stores else "scan")
    return kinds


def _mixed_layout(sass: Sass) -> dict:
    """Where the mixed kernel's parts are in its code: the segments written out one after the
    other (``guards``: the branch over each, taken when the program has no such segment) and
    the loop over any further ones (``outer``), and which part each loop is in (``part``: the
    written-out segment's index, or their count for the loop)."""
    kinds = _loop_kinds(sass)
    outer = [loop for loop, k in zip(sass.loops, kinds) if k == "outer"]
    rows = [loop for loop, k in zip(sass.loops, kinds)
            if k == "rows" and not any(o[0] <= loop[0] <= o[1] for o in outer)]
    if len(outer) != 1 or not rows or kinds.count("rows") != len(rows) + 1:
        raise RuntimeError(f"_givens_fwd_mixed_kernel: unexpected loops {list(zip(sass.loops, kinds))}")
    branches = [(a, int(m.group(1), 16)) for a, t in sass.instrs for m in [_BRANCH.match(t)]
                if m and int(m.group(1), 16) > a]
    guards, after = [], 0
    for (start, end), limit in zip(rows, [r[0] for r in rows[1:]] + [outer[0][0]]):
        found = [(a, target) for a, target in branches if after <= a < start and end < target <= limit]
        if not found:
            raise RuntimeError(f"_givens_fwd_mixed_kernel: no branch over the segment of loop {start:#x}")
        guards.append(min(found))
        after = guards[-1][1]
    part = []
    for start, end in sass.loops:
        if outer[0][0] <= start and end <= outer[0][1]:
            part.append(len(guards))
        else:
            part.append(next(i for i, (a, target) in enumerate(guards) if a < start < target))
    return dict(kinds=kinds, guards=guards, part=part)


def _mixed_classes(launch: Launch, sass: Sass) -> list:
    """The mixed kernel's programs by their segments (:func:`mixed_segments`): a program walks
    its first segments in the parts written out for them, one each, and any more in the loop
    after those; each segment runs its row loop once per slot (the software-pipelined loop's
    trip count, as the forward's) and its scan once per tile load. Segments of adapter -1
    (rows copied) are not priced."""
    if any(adapter < 0 for _, _, adapter in launch.info["tiles"]):
        raise NotImplementedError("the static model prices mixed batches without rows of adapter -1")
    layout = _mixed_layout(sass)
    guards, written = layout["guards"], len(layout["guards"])
    chunks = launch.grid[1]
    out = []
    for segments, count in sorted(collections.Counter(mixed_segments(launch)).items()):
        extra = segments[written:]
        per_part = [segments[i] if i < len(segments) else (0, 0, 0) for i in range(written)]
        # the loop over further segments: their mean, rounded up
        per_part.append((0, -(-sum(s for _, s, _ in extra) // len(extra)),
                         -(-sum(n for _, _, n in extra) // len(extra))) if extra else (0, 0, 0))
        trips = [len(extra) if kind == "outer" else per_part[part][1] if kind == "rows"
                 else per_part[part][2] if kind == "scan" else 0
                 for kind, part in zip(layout["kinds"], layout["part"])]
        absent = guards[len(segments):]
        code = _part(sass, lambda a: not any(g < a < target for g, target in absent)) if absent else sass
        trips = [n for n, loop in zip(trips, sass.loops) if loop in code.loops]
        out.append((count * chunks, trips, code))
    return out


def name_is(launch: Launch, name: str) -> bool:
    return launch.name == name


def _trips(launch: Launch, sass: Sass) -> list:
    """Trip counts of the kernel's runtime loops, in code order.

    The JIT turns an integer argument equal to 1 into a constant, so a loop whose bounds
    are all such constants is gone from the SASS (its body runs once, as straight code).
    """
    a = launch.kwargs
    n_loops = len(sass.loops)
    # an integer argument equal to 1 becomes a constant, unless the kernel keeps it a runtime value
    fixed = {p.name for p in getattr(launch.fn, "params", ()) if p.do_not_specialize}

    def one(name):
        return a[name] == 1 and name not in fixed

    if "n_main" in a or "n_parts" in a:
        # the reduction's loop over the partial rows, BLOCK_P at a time (most column blocks: the
        # chunk launch's rows; v3 summed all rows everywhere)
        loops = [(-(-a.get("n_main", a.get("n_parts")) // a["BLOCK_P"]), True)] + [(1, True)] * (n_loops - 1)
        return [n for n, _ in loops][:n_loops]
    if name_is(launch, "_givens_angles_kernel"):
        # (v3's separate (cos, sin) launch) libdevice's slow path for huge angles: assumed not taken
        return [0] * n_loops
    if "n_full" in a:
        # the whole blocks, then the masked tail
        loops = [(a["n_full"], not one("n_full")), (a["n_iters"] - a["n_full"], not (one("n_full") and one("n_iters")))]
    elif "n_iters" in a:
        loops = [(a["n_iters"], not one("n_iters"))]
    elif launch.name == "_givens_fwd_kernel_v2":  # v2 x @ R^T walks its K chunks (a constant loop)
        loops = [(1 << (a["L"] - a["LC"]), True)] * n_loops
    elif launch.name.endswith("_v2"):  # v2 backward: range(program_id, cdiv(n_rows, BLOCK_N), num_programs)
        loops = [(-(-(-(-a["n_rows"] // a["BLOCK_N"])) // launch.grid[0]), True)]
    else:
        loops = []
    trips = [n for n, present in loops if present]
    if len(trips) == 1 and n_loops == 2:
        # a small loop body unrolled by the compiler: the unrolled loop runs n // U times, a
        # remainder loop of one body the other n % U (U from the two bodies' sizes)
        sizes = [sum(1 for addr, _ in sass.instrs if start <= addr <= end) for start, end in sass.loops]
        big = max(range(2), key=lambda i: sizes[i])
        unroll = max(1, round(sizes[big] / sizes[1 - big]))
        out = [0, 0]
        out[big], out[1 - big] = trips[0] // unroll, trips[0] % unroll
        return out
    if n_loops != len(trips):
        raise RuntimeError(f"{launch.name}: {n_loops} loops in the SASS, expected {len(trips)} (trip counts {trips})")
    return trips


def torch_row(launch: Launch) -> dict:
    """A PyTorch op's launch: its bytes at the copy bandwidth, on every card and constant set."""
    cards = {c.name: {k.name: {"time": launch.torch_bytes / c.copy_bw + k.launch, "waves": 0.0, "bound": "memory",
                               "seconds": {"memory": launch.torch_bytes / c.copy_bw}} for k in c.sets}
             for c in sm90.CARDS}
    return {"launch": launch.name, "hbm_bytes": launch.torch_bytes, "cards": cards}


def evaluate(op, d, rows, dtype, block, scale, launches, cache, **extra) -> list[dict]:
    """The JSON rows of one op, one per card: its launches and the predicted ratios to ``torch.clone``."""
    elem = torch.empty(0, dtype=dtype).element_size()
    parts = [kernel_row(launch, rows, cache) if launch.fn is not None else torch_row(launch) for launch in launches]
    out = []
    for c in sm90.CARDS:
        times = {k.name: sum(p["cards"][c.name][k.name]["time"] for p in parts) for k in c.sets}
        clone = {k.name: sm90.clone_time(rows * d * elem, c, k) for k in c.sets}
        # the configuration reported is the longest Triton launch's (pessimistic constants)
        timed = [(p["cards"][c.name]["pess"]["time"], launch) for p, launch in zip(parts, launches)
                 if launch.fn is not None]
        main = max(timed, key=lambda t: t[0])[1] if timed else None
        cfg = {k: v for k, v in (main.kwargs if main else {}).items()
               if k in ("LE", "LG", "BLOCK_N", "num_warps", "STAGES", "LC", "n_iters", "TILE_BLOCKS", "maxnreg")}
        if main is not None:
            cfg["programs"] = main.grid[0]
            cfg["main_launch"] = main.name
        launches_out = []
        for p in parts:
            mine = {k: v for k, v in p.items() if k != "cards"}
            for name in ("opt", "pess"):
                mine[f"time_{name}"] = p["cards"][c.name][name]["time"]
                mine[f"seconds_{name}"] = p["cards"][c.name][name]["seconds"]
            mine["bound"] = p["cards"][c.name]["pess"]["bound"]
            mine["waves"] = p["cards"][c.name]["pess"]["waves"]
            launches_out.append(mine)
        opt, pess = times["opt"] / clone["opt"], times["pess"] / clone["pess"]
        longest = max(launches_out, key=lambda p: p["time_pess"])
        out.append({
            "kernel": op, "d": d, "rows": rows, "dtype": str(dtype).removeprefix("torch."), "block": block,
            "scale": scale, "gpu": c.name, "config": cfg, "launches": launches_out,
            "predicted_seconds": times["pess"], "predicted_seconds_opt": times["opt"],
            "clone_seconds": clone["pess"], "clone_seconds_opt": clone["opt"],
            "predicted_over_clone": pess, "predicted_over_clone_opt": opt, "predicted_over_clone_pess": pess,
            "waves": max((p["waves"] for p in launches_out), default=0.0),
            "round_trips": max((p.get("round_trips", 0) for p in launches_out), default=0),
            "bound": longest["bound"],
            "hbm_bytes_per_row": sum(p.get("hbm_bytes_per_row", p.get("hbm_bytes", 0) / rows) for p in parts),
            "warp_instructions_per_row": sum(p.get("warp_instructions_per_row", 0) for p in parts),
            "barriers_per_row": sum(p.get("barriers_per_row", 0) for p in parts), **extra})
    return out


# ------------------------------------------------------------------------------------------
# the two reference points

@triton.jit
def _copy_kernel(x, y, n, BLOCK: tl.constexpr):
    """The floor's own shape: ``y = x``, ``BLOCK`` elements per program (Triton tutorial style)."""
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y + o, tl.load(x + o, mask=o < n), mask=o < n)


def copy_launches(rows, d, dtype):
    x = torch.empty(rows, d, dtype=dtype, device="meta")
    block = 1024
    return [Launch("_copy_kernel", _copy_kernel, (triton.cdiv(rows * d, block),),
                   dict(x=x, y=torch.empty_like(x), n=rows * d, BLOCK=block, num_warps=4))]


def v2_launches(op, d, rows, dtype, block):
    """What the v2 kernels (commit ``V2_COMMIT``) launched for ``op``, rebuilt from their source in git."""
    mod = _v2_modules()
    launch = mod["launch"]
    cuda = type("CudaDevice", (), {"type": "cuda"})()
    L = (d - 1).bit_length()
    x = torch.empty(rows, d, dtype=dtype, device="meta")
    n = num_pairs(d)
    coefs = torch.empty((n, 2, 2) if block == "quasi" else (n, 2), dtype=torch.float32, device="meta")
    scale = torch.empty(d, dtype=torch.float32, device="meta")
    offsets = torch.empty(L + 1, dtype=torch.int32, device="meta")
    flags = dict(QUASI=block == "quasi", ACC=tl.float32, ROUND_BF16=False)
    if op in ("forward", "forward_t"):
        cfg = launch.forward_config(1 << L, rows, cuda)
        LC = cfg.chunk.bit_length() - 1
        T = op == "forward_t"
        grid = (triton.cdiv(rows, cfg.block_n), 1 if T else 1 << (L - LC))
        return [Launch("_givens_fwd_kernel_v2", mod["forward"]._givens_fwd_kernel, grid, dict(
            x=x, y=x, coefs=coefs, scale=scale, offsets=offsets, n_rows=rows, d=d, stride_x=d, stride_y=d, L=L,
            LC=LC, BLOCK_N=cfg.block_n, HAS_SCALE=True, TRANSPOSE=T, num_warps=cfg.num_warps, **flags))]
    cfg = launch.backward_config(1 << L, rows, cuda)
    LC = cfg.chunk.bit_length() - 1
    K = 1 << (L - LC)
    groups = max(1, min(triton.cdiv(rows, cfg.block_n), -(-2 * SMS // K)))
    dparams = torch.empty((groups, n) + ((2, 2) if block == "quasi" else ()), dtype=torch.float32, device="meta")
    dscale = torch.empty(groups, d, dtype=torch.float32, device="meta")
    roots = torch.empty(rows, K, dtype=torch.float32, device="meta")
    common = dict(x=x, dy=x, dx=x, roots=roots, coefs=coefs, offsets=offsets, dparams=dparams, n_rows=rows, d=d,
                  stride_x=d, stride_dy=d, stride_dx=d, n_params=n, L=L, LC=LC, TRANSPOSE=False, HAS_DX=True,
                  HAS_DPARAMS=True, **flags)
    out = [Launch("_givens_bwd_kernel_v2", mod["backward"]._givens_bwd_kernel, (groups, K), dict(
        common, scale=scale, dscale=dscale, BLOCK_N=cfg.block_n, HAS_SCALE=True, HAS_DSCALE=True,
        num_warps=cfg.num_warps), info=dict(K=K))]
    if K > 1:
        rcfg = launch.tile_config(K, rows, cuda, tile=2048)
        out.append(Launch("_givens_bwd_roots_kernel_v2", mod["backward"]._givens_bwd_roots_kernel, (groups,),
                          dict(common, BLOCK_N=rcfg.block_n, num_warps=rcfg.num_warps), info=dict(K=K)))
    # the two partial sums
    out += [Launch("torch.sum", torch_bytes=_nbytes(dparams) + n * 16),
            Launch("torch.sum", torch_bytes=_nbytes(dscale))]
    return out


def _git_package(commit: str, name: str, files: dict) -> str:
    """Write ``files`` (``{path in the package: path in the repository}``) as of ``commit`` into a
    new package ``name`` on ``sys.path``; returns its name."""
    tmp = tempfile.mkdtemp(prefix=f"{name}_")
    for dest, src in files.items():
        path = os.path.join(tmp, name, dest)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        text = "" if src is None else subprocess.run(["git", "show", f"{commit}:{src}"], cwd=ROOT,
                                                      capture_output=True, text=True, check=True).stdout
        with open(path, "w") as fh:
            fh.write(text)
    sys.path.insert(0, tmp)
    return name


def _v2_modules():
    global _V2
    if _V2 is None:
        files = {"__init__.py": None, **{f"{m}.py": f"qgoft_kernels/kernels/{m}.py"
                                         for m in ("stages", "forward", "backward", "launch")}}
        pkg = _git_package(V2_COMMIT, "qgoft_v2_kernels", files)
        _V2 = {name: importlib.import_module(f"{pkg}.{name}") for name in ("launch", "forward", "backward")}
    return _V2


_V2 = None


def v3_kernels():
    """The v3 kernels module (commit ``V3_COMMIT``), planning as the package does."""
    global _V3
    if _V3 is None:
        names = ("__init__", "angles", "backward", "forward", "launch", "tree")
        files = {"__init__.py": None, "kernels/__init__.py": "qgoft_kernels/kernels/__init__.py",
                 **{f"kernels/{m}.py": f"qgoft_kernels/kernels/{m}.py" for m in names[1:]}}
        pkg = _git_package(V3_COMMIT, "qgoft_v3", files)
        # v3's launchers ask the package's planning module (``from .. import planning``): the same state
        sys.modules[f"{pkg}.planning"] = importlib.import_module("qgoft_kernels.planning")
        importlib.import_module(pkg).planning = sys.modules[f"{pkg}.planning"]
        _V3 = importlib.import_module(f"{pkg}.kernels")
    return _V3


_V3 = None


# ------------------------------------------------------------------------------------------
# the matrix, the JSON and the table

#: the targets of the default configurations, pessimistic constants, both cards (``merge``: end to end)
TARGETS = {"forward": 1.15, "forward_t": 1.15, "backward": 1.8, "merge": 1.5, "mixed": 1.2}
#: the mixed batch's target holds for runs of at least this many rows (issue 29); shorter runs are priced only
MIXED_TARGET_RUN_ROWS = 16
#: dependent global round trips a row-loop iteration may wait for, at most
MAX_ROUND_TRIPS = 2


def target(op, d):
    return TARGETS[op]


def variant_name(block, scale):
    return block + ("+scale" if scale else "")


@dataclass(frozen=True)
class Task:
    op: str
    d: int
    rows: int
    dtype: str
    block: str
    scale: bool
    env: tuple = ()
    reference: str = ""
    # op "mixed": the batch (:func:`mixed_index`)
    adapters: int = 0
    run_rows: int = 0
    assign: str = ""

    def run(self, cache=None) -> list[dict]:
        cache = {} if cache is None else cache
        dtype = getattr(torch, self.dtype)
        extra = dict(default=not self.env and not self.reference, env=dict(self.env))
        if self.op == "mixed":
            mixed = dict(adapters=self.adapters, run_rows=self.run_rows, assign=self.assign)
            launches = record(self.op, self.d, self.rows, dtype, self.block, self.scale, dict(self.env), mixed=mixed)
            tiles = next(launch.info["tiles"] for launch in launches if "tiles" in launch.info)
            extra.update(mixed, tiles=len(tiles), tile_rows_max=max(n for _, n, _ in tiles),
                         tile_rows_min=min(n for _, n, _ in tiles))
        elif self.reference == "copy":
            launches = copy_launches(self.rows, self.d, dtype)
        elif self.reference == "v2":
            launches = v2_launches(self.op, self.d, self.rows, dtype, self.block)
        elif self.reference == "v3":
            launches = record(self.op, self.d, self.rows, dtype, self.block, self.scale, kernels=v3_kernels())
        else:
            launches = record(self.op, self.d, self.rows, dtype, self.block, self.scale, dict(self.env))
        rows = evaluate(self.op, self.d, self.rows, dtype, self.block, self.scale, launches, cache, **extra)
        for row in rows:
            if self.reference:
                row["reference"] = self.reference
            elif self.op == "mixed" and self.run_rows < MIXED_TARGET_RUN_ROWS:
                pass  # priced, no target
            else:
                row["target_over_clone"] = target(self.op, self.d)
                row["meets_target"] = (row["predicted_over_clone"] <= row["target_over_clone"]
                                       and row["round_trips"] <= MAX_ROUND_TRIPS)
        return rows


#: the v3 reference rows: every op at the widths of the review's findings (docs/tuning.md)
V3_ROWS = [(op, d, v) for d in (1024, 4096, 16384) for op in ("forward", "forward_t", "backward")
           for v in ("quasi+scale", "givens")] + [("merge", 4096, v) for v in ("quasi+scale", "givens")]


def matrix(dims, ops_, variants, rows, dtypes=DTYPES, references=("copy", "v2", "v3"), sweep=True,
           run_rows=RUN_ROWS, assign=ASSIGN, adapters=MIXED_ADAPTERS):
    tasks = []
    for d in dims:
        for op in ops_:
            for dtype in dtypes:
                for name in variants:
                    if op == "merge" and d != 4096:
                        continue
                    if op == "mixed":
                        tasks += [Task(op, d, rows, dtype, *VARIANTS[name], adapters=adapters, run_rows=r, assign=a)
                                  for r in run_rows for a in assign]
                        continue
                    tasks.append(Task(op, d, 4096 if op == "merge" else rows, dtype, *VARIANTS[name]))
    if sweep and 4096 in dims:
        # a few alternatives to the default configuration, for the record
        for op in [o for o in ("forward", "backward") if o in ops_]:
            for bn in (1, 4):
                tasks.append(Task(op, 4096, rows, "bfloat16", "quasi", True, (("QGOFT_BLOCK_N", bn),)))
            tasks.append(Task(op, 4096, rows, "bfloat16", "quasi", True, (("QGOFT_CHUNK", 1024),)))
    if "copy" in references:
        tasks.append(Task("copy", 4096, rows, "bfloat16", "-", False, reference="copy"))
    if "v2" in references:
        for op, d in (("forward", 1024), ("forward", 4096), ("forward_t", 4096), ("backward", 4096)):
            tasks.append(Task(op, d, rows, "bfloat16", "quasi", True, reference="v2"))
    if "v3" in references:
        for op, d, name in V3_ROWS:
            tasks.append(Task(op, d, 4096 if op == "merge" else rows, "bfloat16", *VARIANTS[name], reference="v3"))
    return tasks


def _run_task(task):
    return task.run()


def _commit():
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "qgoft_kernels"],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


def _key(r):
    return (r["kernel"], r["d"], r["dtype"], r["block"], r["scale"], r.get("reference", ""), r.get("default"),
            tuple(sorted(r.get("env", {}).items())))


def table(rows, dtypes=("bfloat16",)) -> str:
    """The markdown table of the default configurations and the references (v3's are in :func:`versus`):
    one line per op, both cards."""
    head = ("| op | d | variant | tile (E x G, rows, warps) | regs | CTAs x warps / SM | waves | round trips "
            "| warp-instr / row | barriers / row | bound | H100 opt - pess | H200 opt - pess | target |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    by = collections.defaultdict(dict)
    for r in rows:
        if ((r.get("default") or r.get("reference") in ("copy", "v2")) and r["dtype"] in dtypes
                and r["kernel"] != "mixed"):
            by[_key(r)][r["gpu"]] = r
    lines = []
    for key, cards in by.items():
        h100, h200 = cards.get("H100-SXM"), cards.get("H200")
        r = h200 or h100
        kernels = [p for p in r["launches"] if "regs" in p]
        if not kernels:
            continue
        main = max(kernels, key=lambda p: p["time_pess"])
        c = r["config"]
        tile = (f"{1 << c['LE']} x {1 << c['LG']}, {c['BLOCK_N']}, {c['num_warps']}" if "LE" in c
                else f"{c.get('BLOCK_N', '-')} rows, {c.get('num_warps', '-')} warps")
        name = r["kernel"] + (f" ({r['reference']})" if r.get("reference") else "")
        if "target_over_clone" in r:
            met = all(x["meets_target"] for x in cards.values())
            goal = f"<= {r['target_over_clone']:g}" + (" met" if met else " **missed**")
        else:
            goal = "-"

        def both(x):
            return "-" if x is None else f"{x['predicted_over_clone_opt']:.2f} - {x['predicted_over_clone_pess']:.2f}"
        lines.append(f"| {name} | {r['d']} | {variant_name(r['block'], r['scale']) if r['block'] != '-' else '-'} "
                     f"| {tile} | {main['regs']} | {main['ctas_per_sm']} x {main['num_warps']} | {r['waves']:.2f} "
                     f"| {r['round_trips']} | {r['warp_instructions_per_row']:,.0f} | {r['barriers_per_row']:.1f} "
                     f"| {r['bound']} | {both(h100)} | {both(h200)} | {goal} |")
    return head + "\n".join(lines) + "\n"


def mixed_table(rows, dtypes=("bfloat16",)) -> str:
    """The markdown table of the mixed batches: one line per width, variant, run length and
    assignment, both cards."""
    head = ("| d | dtype | variant | runs of | adapters to runs | tiles (rows) | regs | CTAs x warps / SM | waves "
            "| round trips | bound | H100 opt - pess | H200 opt - pess | target |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    by = collections.defaultdict(dict)
    for r in rows:
        if r["kernel"] == "mixed" and r["dtype"] in dtypes:
            by[(r["d"], r["dtype"], r["block"], r["scale"], r["run_rows"], r["assign"])][r["gpu"]] = r

    def both(x):
        return "-" if x is None else f"{x['predicted_over_clone_opt']:.2f} - {x['predicted_over_clone_pess']:.2f}"
    lines = []
    for key in sorted(by, key=lambda k: (k[0], k[1], -k[4], k[5], list(VARIANTS).index(variant_name(k[2], k[3])))):
        cards = by[key]
        h100, h200 = cards.get("H100-SXM"), cards.get("H200")
        r = h200 or h100
        main = max((p for p in r["launches"] if "regs" in p), key=lambda p: p["time_pess"])
        rows_ = (f"{r['tile_rows_min']}" if r["tile_rows_min"] == r["tile_rows_max"]
                 else f"{r['tile_rows_min']}-{r['tile_rows_max']}")
        if "target_over_clone" in r:
            met = all(x["meets_target"] for x in cards.values())
            goal = f"<= {r['target_over_clone']:g}" + (" met" if met else " **missed**")
        else:
            goal = "-"
        lines.append(f"| {r['d']} | {r['dtype']} | {variant_name(r['block'], r['scale'])} | {r['run_rows']} "
                     f"| {r['assign']} | {r['tiles']} ({rows_}) | {main['regs']} | {main['ctas_per_sm']} x "
                     f"{main['num_warps']} | {r['waves']:.2f} | {r['round_trips']} | {r['bound']} | {both(h100)} "
                     f"| {both(h200)} | {goal} |")
    return head + "\n".join(lines) + "\n"


def versus(rows, dtype="bfloat16") -> str:
    """The markdown table of the v3 reference rows beside v4's default rows of the same op, both cards."""
    head = ("| op | d | variant | v3 H100 opt - pess | v3 H200 opt - pess | v3 round trips, waves, bound "
            "| v4 H100 opt - pess | v4 H200 opt - pess | v4 round trips, waves, bound |\n"
            "|---|---|---|---|---|---|---|---|---|\n")
    by = collections.defaultdict(dict)
    for r in rows:
        if r["dtype"] == dtype and (r.get("default") or r.get("reference") == "v3"):
            by[(r["kernel"], r["d"], r["block"], r["scale"], r.get("reference", ""))][r["gpu"]] = r

    def both(cards, card):
        x = cards.get(card)
        return "-" if x is None else f"{x['predicted_over_clone_opt']:.2f} - {x['predicted_over_clone_pess']:.2f}"

    def shape(cards):
        x = cards.get("H200") or cards.get("H100-SXM")
        return f"{x['round_trips']}, {x['waves']:.2f}, {x['bound']}"
    lines = []
    for (op, d, block, scale, ref), old in by.items():
        new = by.get((op, d, block, scale, ""))
        if ref != "v3" or not new:
            continue
        lines.append(f"| {op} | {d} | {variant_name(block, scale)} | {both(old, 'H100-SXM')} | {both(old, 'H200')} "
                     f"| {shape(old)} | {both(new, 'H100-SXM')} | {both(new, 'H200')} | {shape(new)} |")
    return head + "\n".join(lines) + "\n"


def _rounded(x):
    """``x`` with its floats to four significant digits (the model is not more exact than that)."""
    if isinstance(x, float):
        return float(f"{x:.4g}")
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_rounded(v) for v in x]
    return x


def dumps(meta, rows) -> str:
    """The JSON file: the metadata, then one row per line (short diffs, a small file)."""
    lines = ",\n".join(json.dumps(_rounded(r), separators=(",", ":")) for r in rows)
    return f'{{"meta": {json.dumps(meta)},\n "rows": [\n{lines}\n]}}\n'


def write_table(path, text, name="sass"):
    with open(path) as fh:
        doc = fh.read()
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if start not in doc:
        raise SystemExit(f"{path} has no {start} ... {end} markers")
    before, rest = doc.split(start, 1)
    _, after = rest.split(end, 1)
    with open(path, "w") as fh:
        fh.write(f"{before}{start}\n{text}{end}{after}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sass", description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=list(DIMS))
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=ALL_OPS,
                        help="mixed (a mixed batch, each row its own adapter) only when named")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--rows", type=int, default=16384)
    parser.add_argument("--run-rows", type=int, nargs="+", default=list(RUN_ROWS),
                        help="mixed: the rows come in runs of this many rows of one adapter")
    parser.add_argument("--assign", nargs="+", default=list(ASSIGN), choices=ASSIGN,
                        help="mixed: adapters given to the runs in turn, or at random (seed 0)")
    parser.add_argument("--adapters", type=int, default=MIXED_ADAPTERS, help="mixed: adapters stacked")
    parser.add_argument("--references", nargs="*", default=["copy", "v2", "v3"], choices=["copy", "v2", "v3"],
                        help="the reference points to add (none: --references)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the non-default configurations")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile in this many processes")
    parser.add_argument("--out", default=DEFAULT_OUT, help="the JSON file to write")
    parser.add_argument("--table", default=None, help="a markdown file whose sass markers get the table "
                        "(and its sass-v3 markers the v3 rows beside v4's)")
    parser.add_argument("--from-json", default=None, help="make the tables from this JSON instead of compiling")
    args = parser.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as fh:
            rows = json.load(fh)["rows"]
        text = table(rows)
        print(text)
        if any(r["kernel"] == "mixed" for r in rows):
            print(mixed_table(rows, tuple(args.dtypes)))
        if args.table:
            write_table(args.table, text)
            write_table(args.table, versus(rows), "sass-v3")
        return 0
    tasks = matrix(args.dims, args.ops, args.variants, args.rows, args.dtypes, args.references, not args.no_sweep,
                   args.run_rows, args.assign, args.adapters)
    print(f"{len(tasks)} ops to compile for sm_90 with triton {triton.__version__} ({args.jobs} processes)",
          flush=True)
    if args.jobs > 1:
        with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
            rows = [r for out in pool.map(_run_task, tasks) for r in out]
    else:
        rows = [r for task in tasks for r in task.run()]
    meta = dict(tool="benchmarks/sass.py", arch="sm_90", triton=triton.__version__, torch=torch.__version__,
                commit=_commit(), date=datetime.date.today().isoformat(),
                cards={c.name: dict(sms=c.sms, copy_bw=c.copy_bw) for c in sm90.CARDS},
                constants={k.name: dataclasses.asdict(k) for k in sm90.SETS})
    for row in rows:
        row.update(commit=meta["commit"], triton=meta["triton"])
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        fh.write(dumps(meta, rows))
    text = table(rows)
    print(text)
    if "mixed" in args.ops:
        print(mixed_table(rows, tuple(args.dtypes)))
    if args.table:
        write_table(args.table, text)
        write_table(args.table, versus(rows), "sass-v3")
    missed = [r for r in rows if r.get("default") and not r.get("meets_target", True)]
    print(f"wrote {args.out}; {len(missed)} default configuration(s) miss their target")
    return 0


if __name__ == "__main__":
    sys.exit(main())
