"""The dense formulation's row passes compiled for this CPU (``_cpu_kernels.c``, docs/math.md §6).

ATen applies ``blockdiag(B)`` to rows as one BLAS call per block over strided memory, and
the roots as separate strided passes; each is a pass over all the rows. The C kernels take
a tile of rows through every block and the roots while it is in the cache: one pass for
``x @ R`` (or ``W @ R^T``), one for the whole backward (``dx`` and the blocks' and ``Q``'s
gradients). They are built on first use with the C compiler that is there (``cc``,
``-O3 -march=native -fopenmp``), once per source, compiler and CPU, into a cache directory
(``QGOFT_CACHE_DIR``, else ``$XDG_CACHE_HOME/qgoft_kernels``, else ``~/.cache/qgoft_kernels``;
where that cannot be written, a private temporary directory, once per process).
Without a compiler, or with ``QGOFT_NATIVE`` false (``0``, ``false``, ``off``, ``no``),
:func:`library` is ``None`` and the dense formulation uses its ATen ops instead (the same
results up to rounding). A build in the cache is loaded only when the stamp written beside it
after its build (``<name>.so.sha256``, the library's SHA-256) matches it: a truncated, foreign
or garbage file there is built again instead. A loaded library that does not report this
source's ABI version (:data:`ABI_VERSION`) is not used: one warning, and ATen's ops.
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

from .checks import env_flag

SOURCE = Path(__file__).with_name("_cpu_kernels.c")
#: The kernels' limits (``MAX_B`` and ``MAX_NB`` in the source).
MAX_BLOCK, MAX_BLOCKS = 64, 1024
#: The most factors in one value's product that :func:`build` takes (``MAX_K1``).
MAX_FACTORS = 64
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=gnu11"]
_LIBS = ["-lm"]
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}


#: The ABI the Python side expects of the library (``qgoft_abi_version`` in the source).
ABI_VERSION = 3


def enabled() -> bool:
    """Whether the compiled kernels may be used: ``QGOFT_NATIVE`` true (``1``, ``true``, ``on``,
    ``yes``; the default) or false (``0``, ``false``, ``off``, ``no``), any case
    (:func:`qgoft_kernels.checks.env_flag`). Read at every call; any other value raises a
    ``ValueError``. A forward that used the kernels has its backward use them too, whatever the
    variable says by then (the decision is the forward's)."""
    return env_flag("QGOFT_NATIVE", True, ("use the compiled CPU kernels", "use ATen's ops"))


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


def _stamp(target: Path) -> Path:
    """The file beside a build that holds its SHA-256, written once the build is in place."""
    return target.with_name(target.name + ".sha256")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _intact(target: Path) -> bool:
    """Whether ``target`` is a whole build of ours: its stamp is there and names its contents.
    Loading a truncated library can kill the process (SIGBUS), so this comes first."""
    try:
        return _stamp(target).read_text().strip() == _digest(target)
    except OSError:
        return False


def _compile(compiler: str) -> Path:
    """The path of the kernels built for this source, compiler and CPU: from the cache where an
    intact build is there (:func:`_intact`), else built (again) into it."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(_FLAGS + _LIBS), version, _cpu_signature()]).encode())
    target = _cache_dir() / f"qgoft_cpu_{key.hexdigest()[:16]}.so"
    if _intact(target):
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # built beside the target and renamed into place: another process may be building it too
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    except OSError:
        # no cache to write (a read-only home, say): built for this process alone, in a
        # directory of its own that only this user can write
        target = Path(tempfile.mkdtemp(prefix="qgoft_kernels-")) / target.name
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *_FLAGS, str(SOURCE), "-o", tmp, *_LIBS], check=True, capture_output=True, text=True,
                       timeout=300)
        digest = _digest(Path(tmp))
        os.replace(tmp, target)
        # the stamp last, also renamed into place: a reader that finds it finds the whole build
        # (or another process's build of the same key, which then fails the check and is rebuilt)
        fd, stamp = tempfile.mkstemp(suffix=".sha256", dir=target.parent)
        with os.fdopen(fd, "w") as f:
            f.write(digest + "\n")
        os.replace(stamp, _stamp(target))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _abi(lib) -> int | None:
    """The library's ``qgoft_abi_version()``, or ``None`` where it has no such symbol (not ours)."""
    try:
        version = lib.qgoft_abi_version
    except AttributeError:
        return None
    version.restype = ctypes.c_int
    return version()


def _open(compiler: str):
    """The kernels' library loaded (built first where the cache has no intact build of it), or
    ``None`` with a warning where what loads is not this source's library."""
    path = _compile(compiler)
    lib = ctypes.CDLL(str(path))
    version = _abi(lib)
    if version != ABI_VERSION:
        warnings.warn(f"qgoft_kernels: {path} is not this version's CPU kernels (qgoft_abi_version: "
                      f"{'missing' if version is None else version}, expected {ABI_VERSION}); using ATen ops instead",
                      RuntimeWarning, stacklevel=4)
        return None
    return lib


@functools.lru_cache(maxsize=None)
def _load():
    compiler = _compiler()
    if compiler is None:
        return None
    try:
        lib = _open(compiler)
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", "") or error
        warnings.warn(f"qgoft_kernels: the CPU kernels did not build ({detail}); using ATen ops instead",
                      RuntimeWarning, stacklevel=3)
        return None
    if lib is None:
        return None
    p, i, long = ctypes.c_void_p, ctypes.c_int, ctypes.c_long
    for suffix in _SUFFIX.values():
        rotate = getattr(lib, f"qgoft_rotate_{suffix}")
        rotate.argtypes = [long, i, i, p, long, p, p, i, p, long, i]
        rotate.restype = None
        runs = getattr(lib, f"qgoft_rotate_runs_{suffix}")
        runs.argtypes = [long, long, p, i, i, long, p, long, p, long, p, long, p, long, i]
        runs.restype = None
        backward = getattr(lib, f"qgoft_backward_{suffix}")
        backward.argtypes = [long, i, i, p, long, p, long, p, p, p, p, p, long, p, p, p, i]
        backward.restype = None
        build = getattr(lib, f"qgoft_build_{suffix}")
        build.argtypes = [long, i, p, long, p, p, long, i, p, p, p, long, p, p, p, p, p]
        build.restype = None
        build_backward = getattr(lib, f"qgoft_build_backward_{suffix}")
        build_backward.argtypes = [long, i, p, p, p, p, p, p, long, p, long, p, p]
        build_backward.restype = None
    return lib


def library():
    """The compiled kernels, or ``None`` (turned off, no compiler, or the build failed)."""
    return _load() if enabled() else None


def _kernels():
    """The loaded kernels for the calls below, whatever ``QGOFT_NATIVE`` says now: whether to
    use them is decided by :func:`applies` and :func:`builds` (a backward runs the kernels
    its forward chose, also if the variable changed in between)."""
    lib = _load()
    if lib is None:
        raise RuntimeError("qgoft_kernels: the compiled CPU kernels are not built here (no compiler, or the build "
                           "failed); check native.applies() or native.builds() before calling them")
    return lib


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def in_memory(t: torch.Tensor) -> bool:
    """Whether ``t`` is a CPU tensor whose data the kernels can read: not on the meta device,
    and not a ``FakeTensor`` (``FakeTensorMode``, the compiler's tracing), whose data pointers
    point at nothing. The kernels (and the buffers reused for them) take such tensors only."""
    if t.device.type != "cpu":
        return False
    if type(t) in _PLAIN:
        return True
    from torch._subclasses.fake_tensor import is_fake
    return not is_fake(t)


def applies(x: torch.Tensor, blocks: tuple[int, int]) -> bool:
    """Whether the kernels take rows ``x`` (``[T, nb * b]``) with ``blocks = (nb, b)``: on the
    CPU in memory (:func:`in_memory`), in float32 or float64, unit stride along the features,
    and blocks within the kernels' limits."""
    nb, b = blocks
    return (in_memory(x) and x.dtype in _SUFFIX and x.dim() == 2 and x.stride(1) == 1
            and b <= MAX_BLOCK and nb <= MAX_BLOCKS and library() is not None)


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def rotate(x: torch.Tensor, blocks: torch.Tensor, Q: torch.Tensor | None, transpose: bool,
           out: torch.Tensor, transposed: tuple | None = None) -> torch.Tensor:
    """``out = x @ R`` or, with ``transpose``, ``x @ R^T``, for ``R = U blockdiag(blocks)``:
    rows ``x`` ``[T, nb * b]`` (unit stride along the features), ``blocks`` ``[nb, b, b]`` and
    ``Q`` ``[nb, nb]`` (``U``; ``None``: the identity), into ``out`` (rows of the same shape).
    ``transposed``: ``(blocks^T, Q^T)`` where the caller has them (:func:`build`), else they
    are made here."""
    nb, b, _ = blocks.shape
    fn = getattr(_kernels(), f"qgoft_rotate_{_SUFFIX[x.dtype]}")
    # x @ R^T = x @ blockdiag(B^T) @ U^T: the kernel reads the transposed blocks, then Q^T
    if transpose:
        M, mix = transposed or (blocks.transpose(1, 2), None if Q is None else Q.T)
    else:
        M, mix = blocks, Q
    M, mix = M.contiguous(), None if mix is None else mix.contiguous()
    fn(x.shape[0], nb, b, _ptr(x), x.stride(0), _ptr(M), _ptr(mix), int(not transpose), _ptr(out), out.stride(0),
       torch.get_num_threads())
    return out


def rotate_runs(x: torch.Tensor, runs: torch.Tensor, d: int, blocks: torch.Tensor, Q: torch.Tensor | None,
                out: torch.Tensor) -> torch.Tensor:
    """``out = x @ R_a`` for runs of consecutive rows, ``runs`` int64 ``[n, 3]`` (first row, rows,
    adapter ``a``), ``R_a = U_a blockdiag(blocks[a])``: rows ``x`` ``[T, nb * b]`` (unit stride
    along the features), stacked ``blocks`` ``[A, nb, b, b]`` and ``Q`` ``[A, nb, nb]`` (``None``:
    no mix), all contiguous. Runs of adapter ``-1`` copy their first ``d`` values unchanged."""
    _, nb, b, _ = blocks.shape
    fn = getattr(_kernels(), f"qgoft_rotate_runs_{_SUFFIX[x.dtype]}")
    fn(x.shape[0], runs.shape[0], _ptr(runs), nb, b, d, _ptr(x), x.stride(0), _ptr(blocks), nb * b * b, _ptr(Q),
       nb * nb, _ptr(out), out.stride(0), torch.get_num_threads())
    return out


def backward(x, g, blocks, Q, dx, dblocks, dQ, scratch: torch.Tensor, transposed: tuple | None = None) -> None:
    """For ``y = x @ U @ blockdiag(blocks)`` and ``g = dy``: ``dx`` (rows like ``x``),
    ``dblocks`` (``[nb, b, b]``) and ``dQ`` (``[nb, nb]``), each written where it is given
    (``None``: not wanted). ``scratch`` holds at least :func:`scratch_size` values;
    ``transposed`` is as for :func:`rotate`."""
    nb, b, _ = blocks.shape
    threads = torch.get_num_threads()
    if scratch.numel() < scratch_size(nb, b, Q is not None):
        raise ValueError(f"scratch: {scratch.numel()} values, fewer than the {scratch_size(nb, b, Q is not None)} "
                         "the threads' sums need")
    fn = getattr(_kernels(), f"qgoft_backward_{_SUFFIX[x.dtype]}")
    # kept in names until the call returns: the kernel reads them through their pointers
    blocks_t, QT = transposed or (blocks.transpose(1, 2), None if Q is None else Q.T)
    blocks, blocks_t = blocks.contiguous(), blocks_t.contiguous()
    Q, QT = (None, None) if Q is None else (Q.contiguous(), QT.contiguous())
    fn(x.shape[0], nb, b, _ptr(x), x.stride(0), _ptr(g), g.stride(0), _ptr(blocks), _ptr(blocks_t), _ptr(Q),
       _ptr(QT), _ptr(dx), dx.stride(0) if dx is not None else 0, _ptr(dblocks), _ptr(dQ), _ptr(scratch), threads)


def scratch_size(nb: int, b: int, with_q: bool) -> int:
    """Values :func:`backward` needs for its threads' own sums."""
    return torch.get_num_threads() * (nb * b * b + (nb * nb if with_q else 0))


def builds(params: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype, factors: int) -> bool:
    """Whether :func:`build` takes these parameters: on the CPU in memory (:func:`in_memory`) and
    already in ``dtype`` (float32 or float64), with at most :data:`MAX_FACTORS` factors per value."""
    return (in_memory(params) and (scale is None or in_memory(scale)) and dtype in _SUFFIX and params.dtype == dtype
            and (scale is None or scale.dtype == dtype) and factors <= MAX_FACTORS and library() is not None)


def build(params: torch.Tensor, scale: torch.Tensor | None, givens: bool, gather: torch.Tensor,
          pos: torch.Tensor, sign: torch.Tensor | None, size: int, pos_t: torch.Tensor | None = None):
    """``(flat, flat_t, (source, CH, P))``: dense.py's ``_build`` in one call (see there for
    the layout), and with ``pos_t`` (the positions in the transposed factors) ``flat_t``, the
    same values in ``cat(blocks^T, Q^T, spare)`` (else ``None``). ``gather`` ``[N, 2, K1]``,
    ``pos`` ``[N * K1]`` and ``pos_t`` are contiguous int64, ``sign`` ``[N, K1]`` of the
    parameters' dtype."""
    fn = getattr(_kernels(), f"qgoft_build_{_SUFFIX[params.dtype]}")
    N, _, K1 = gather.shape
    count = params.shape[0]
    entries = (2 if givens else 4) * count
    nscale = 0 if scale is None else scale.shape[0]
    nsource = entries + 4 + nscale
    # the values in one buffer, what the backward reads in another: the factors leave the call
    values = params.new_empty(size * (1 if pos_t is None else 2))
    kept = params.new_empty(nsource + 3 * N * K1)
    flat, flat_t = values[:size], (None if pos_t is None else values[size:])
    source, CH, P = kept.split([nsource, 2 * N * K1, N * K1])
    CH, P = CH.view(N, 2, K1), P.view(N, K1)
    params, scale = params.contiguous(), None if scale is None else scale.contiguous()
    fn(count, int(givens), _ptr(params), nscale, _ptr(scale), _ptr(source), N, K1, _ptr(gather), _ptr(pos),
       _ptr(sign), size, _ptr(flat), _ptr(pos_t), _ptr(flat_t), _ptr(CH), _ptr(P))
    return flat, flat_t, (source, CH, P)


def build_backward(dflat: torch.Tensor, saved, givens: bool, count: int, gather: torch.Tensor, pos: torch.Tensor,
                   sign: torch.Tensor | None):
    """``(dsource, dangles)``: dense.py's ``_build_backward`` up to the parameters, in one call,
    from ``dflat`` (contiguous) and what :func:`build` kept; ``dangles`` (the angles'
    gradients) with ``givens``, else ``None``."""
    source, CH, P = saved
    fn = getattr(_kernels(), f"qgoft_build_backward_{_SUFFIX[source.dtype]}")
    N, _, K1 = gather.shape
    nsource = source.shape[0]
    out = source.new_empty(nsource + (count if givens else 0))
    dsource, dangles = out[:nsource], (out[nsource:] if givens else None)
    fn(N, K1, _ptr(dflat), _ptr(gather), _ptr(pos), _ptr(sign), _ptr(CH), _ptr(P), nsource, _ptr(dsource), count,
       _ptr(source), _ptr(dangles))
    return dsource, dangles
