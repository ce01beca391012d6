"""The real compiler, not the interpreter: every kernel variant compiles for sm_90.

The interpreter runs kernels as Python, so it misses what only the compiler rejects (a
constexpr rebound in an unrolled loop, a shape the layout passes cannot handle). Triton's
NVIDIA backend compiles without a GPU, so this runs on CPU-only machines too.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_kernels_compile_for_sm90():
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # a small chunk so that the roots paths are compiled too
    env.update(QGOFT_CHUNK="256", PYTHONPATH=str(ROOT), TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compile_report.py"), "--dims", "2000"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("fwd", "bwd"))]
    # fwd, bwd and bwd-roots, four variants each
    assert len(lines) == 12, proc.stdout
