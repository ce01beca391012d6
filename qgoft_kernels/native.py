"""The dense formulation's row passes compiled for this CPU (``_cpu_kernels.c``, docs/math.md §6).

ATen applies ``blockdiag(B)`` to rows as one BLAS call per block over strided memory, and
the roots as separate strided passes; each is a pass over all the rows. The C kernels take
a tile of rows through every block and the roots while it is in the cache: one pass for
``x @ R`` (or ``W @ R^T``), one for the whole backward (``dx`` and the blocks' and ``Q``'s
gradients). They are built on first use with the C compiler that is there (``cc``,
``-O3 -march=native -fopenmp``), once per source, compiler and CPU, into a cache directory
(``QGOFT_CACHE_DIR``, else ``$XDG_CACHE_HOME/qgoft_kernels``, else ``~/.cache/qgoft_kernels``).
Without a compiler, or with ``QGOFT_NATIVE=0``, :func:`library` is ``None`` and the dense
formulation uses its ATen ops instead (the same results up to rounding).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("_cpu_kernels.c")
#: The kernels' limits (``MAX_B`` and ``MAX_NB`` in the source).
MAX_BLOCK, MAX_BLOCKS = 64, 1024
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=gnu11"]
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}


def enabled() -> bool:
    """Whether the compiled kernels may be used (``QGOFT_NATIVE=0`` turns them off)."""
    return os.environ.get("QGOFT_NATIVE", "1") != "0"


def _cache_dir() -> Path:
    if os.environ.get("QGOFT_CACHE_DIR"):
        return Path(os.environ["QGOFT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qgoft_kernels"


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: the machine and its CPU's model and flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [line for line in info.splitlines() if line.startswith(("model name", "flags", "Features"))]
        cpu = "\n".join(dict.fromkeys(lines))
    except OSError:
        cpu = platform.processor()
    return f"{platform.machine()}\n{cpu}"


def _compile(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(_FLAGS), version, _cpu_signature()]).encode())
    target = _cache_dir() / f"qgoft_cpu_{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # built beside the target and renamed into place: another process may be building it too
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *_FLAGS, str(SOURCE), "-o", tmp], check=True, capture_output=True, text=True,
                       timeout=300)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


@functools.lru_cache(maxsize=None)
def _load():
    compiler = _compiler()
    if compiler is None:
        return None
    try:
        lib = ctypes.CDLL(str(_compile(compiler)))
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", "") or error
        warnings.warn(f"qgoft_kernels: the CPU kernels did not build ({detail}); using ATen ops instead",
                      RuntimeWarning, stacklevel=3)
        return None
    if lib.qgoft_abi_version() != 1:
        return None
    p, i, long = ctypes.c_void_p, ctypes.c_int, ctypes.c_long
    for suffix in _SUFFIX.values():
        rotate = getattr(lib, f"qgoft_rotate_{suffix}")
        rotate.argtypes = [long, i, i, p, long, p, p, i, p, long, i]
        rotate.restype = None
        backward = getattr(lib, f"qgoft_backward_{suffix}")
        backward.argtypes = [long, i, i, p, long, p, long, p, p, p, p, p, long, p, p, p, i]
        backward.restype = None
    return lib


def library():
    """The compiled kernels, or ``None`` (turned off, no compiler, or the build failed)."""
    return _load() if enabled() else None


def applies(x: torch.Tensor, blocks: torch.Tensor) -> bool:
    """Whether the kernels take rows ``x`` (``[T, nb * b]``) with these blocks: on the CPU, in
    float32 or float64, unit stride along the features, and blocks within the kernels' limits."""
    nb, b, _ = blocks.shape
    return (x.device.type == "cpu" and x.dtype in _SUFFIX and x.dim() == 2 and x.stride(1) == 1
            and b <= MAX_BLOCK and nb <= MAX_BLOCKS and library() is not None)


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def rotate(x: torch.Tensor, blocks: torch.Tensor, Q: torch.Tensor | None, transpose: bool,
           out: torch.Tensor) -> torch.Tensor:
    """``out = x @ R`` or, with ``transpose``, ``x @ R^T``, for ``R = U blockdiag(blocks)``:
    rows ``x`` ``[T, nb * b]`` (unit stride along the features), ``blocks`` ``[nb, b, b]`` and
    ``Q`` ``[nb, nb]`` (``U``; ``None``: the identity), into ``out`` (rows of the same shape)."""
    nb, b, _ = blocks.shape
    fn = getattr(library(), f"qgoft_rotate_{_SUFFIX[x.dtype]}")
    # x @ R^T = x @ blockdiag(B^T) @ U^T: the kernel reads the transposed blocks, then Q^T
    M = blocks.transpose(1, 2).contiguous() if transpose else blocks.contiguous()
    mix = None if Q is None else (Q.T if transpose else Q).contiguous()
    fn(x.shape[0], nb, b, _ptr(x), x.stride(0), _ptr(M), _ptr(mix), int(not transpose), _ptr(out), out.stride(0),
       torch.get_num_threads())
    return out


def backward(x, g, blocks, Q, dx, dblocks, dQ, scratch: torch.Tensor) -> None:
    """For ``y = x @ U @ blockdiag(blocks)`` and ``g = dy``: ``dx`` (rows like ``x``),
    ``dblocks`` (``[nb, b, b]``) and ``dQ`` (``[nb, nb]``), each written where it is given
    (``None``: not wanted). ``scratch`` holds at least :func:`scratch_size` values."""
    nb, b, _ = blocks.shape
    threads = torch.get_num_threads()
    if scratch.numel() < scratch_size(nb, b, Q is not None):
        raise ValueError(f"scratch: {scratch.numel()} values, fewer than the {scratch_size(nb, b, Q is not None)} "
                         "the threads' sums need")
    fn = getattr(library(), f"qgoft_backward_{_SUFFIX[x.dtype]}")
    # kept in names until the call returns: the kernel reads them through their pointers
    blocks, blocks_t = blocks.contiguous(), blocks.transpose(1, 2).contiguous()
    Q, QT = (None, None) if Q is None else (Q.contiguous(), Q.T.contiguous())
    fn(x.shape[0], nb, b, _ptr(x), x.stride(0), _ptr(g), g.stride(0), _ptr(blocks), _ptr(blocks_t), _ptr(Q),
       _ptr(QT), _ptr(dx), dx.stride(0) if dx is not None else 0, _ptr(dblocks), _ptr(dQ), _ptr(scratch), threads)


def scratch_size(nb: int, b: int, with_q: bool) -> int:
    """Values :func:`backward` needs for its threads' own sums."""
    return torch.get_num_threads() * (nb * b * b + (nb * nb if with_q else 0))
