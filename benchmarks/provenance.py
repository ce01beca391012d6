"""Where a result comes from: the commit, the driver, and whether this machine can run it.

A lent GPU machine gets a copy of the working tree, maybe without ``.git`` and without
``git``. :func:`commit_id` then falls back to a commit id passed in (docs/environment.md).
"""
from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: Triton's compile cache for the GPU commands: an ignored folder of the repository.
TRITON_CACHE = os.path.join(REPO, ".triton-cache")


def _git(root: str, *args: str) -> str | None:
    try:
        proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def commit_id(root: str = REPO) -> tuple[str, str]:
    """``(commit, source)``: the checked-out commit and where it was read.

    In order: ``git`` (short id, ``+dirty`` for uncommitted changes to tracked files), only
    when ``root`` is the top of its own repository (a copy placed inside another repository
    must not report that one's commit); the ``QGOFT_COMMIT`` variable; the first line of a
    ``COMMIT`` file in ``root``. ``("unknown", "none")`` when all fail.
    """
    top = _git(root, "rev-parse", "--show-toplevel")
    if top and os.path.isdir(top) and os.path.samefile(top, root):
        sha = _git(root, "rev-parse", "--short", "HEAD")
        if sha:
            dirty = _git(root, "status", "--porcelain", "--untracked-files=no")
            return sha + ("+dirty" if dirty else ""), "git"
    env = os.environ.get("QGOFT_COMMIT", "").strip()
    if env:
        return env, "QGOFT_COMMIT"
    path = os.path.join(root, "COMMIT")
    if os.path.isfile(path):
        with open(path) as fh:
            line = fh.readline().strip()
        if line:
            return line, "COMMIT file"
    return "unknown", "none"


def driver_version() -> str | None:
    """The NVIDIA driver version from ``nvidia-smi``, or ``None`` where that fails."""
    try:
        proc = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = proc.stdout.strip().splitlines()
    return lines[0].strip() if proc.returncode == 0 and lines else None


def require_cuda(command: str) -> bool:
    """``True`` when torch sees a CUDA device; otherwise say why the command stops, on stderr."""
    import torch

    if torch.cuda.is_available():
        return True
    print(f"{command}: no CUDA device (torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}, "
          "sees none). This command measures the Triton kernels on a GPU; without one it would only "
          "time the CPU fallbacks, so it stops here.", file=sys.stderr)
    return False


def interpreter_problem() -> str | None:
    """Why the Triton interpreter cannot run here, for a known bad version pair; else ``None``.

    Triton 3.6's interpreter fails with numpy >= 2.4 (docs/environment.md): ``TypeError: only
    0-dimensional arrays can be converted to Python scalars`` at a ``range(...)`` whose bounds
    come from ``tl.program_id``/``tl.cdiv``. Triton 3.9 with numpy 2.4 works.
    """
    import numpy
    import triton

    def major_minor(version):
        return tuple(int(p) for p in version.split("+")[0].split(".")[:2])

    if major_minor(triton.__version__) == (3, 6) and major_minor(numpy.__version__) >= (2, 4):
        return (f"triton {triton.__version__}'s interpreter fails with numpy {numpy.__version__} "
                "(needs numpy < 2.4 with triton 3.6; see docs/environment.md)")
    return None
