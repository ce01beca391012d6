"""A GPU command's CPU rehearsal run in a subprocess, as its make target runs it (for the tests)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .provenance import REPO, interpreter_problem


def run(module: str, args: list[str], tmp, out_name: str) -> tuple[str, list[dict]]:
    """``python -m module --dry-run --out tmp/out *args``: its stdout and the JSON lines of ``out_name``.

    Skips the test where the Triton interpreter cannot run; fails it on a non-zero exit.
    """
    problem = interpreter_problem()
    if problem:
        pytest.skip(problem)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "QGOFT_POISON")}
    env.update(PYTHONPATH=REPO, TRITON_CACHE_DIR=str(tmp / "cache"), QGOFT_COMMIT="unused-when-git-works")
    proc = subprocess.run([sys.executable, "-m", module, "--dry-run", "--out", str(tmp / "out"), *args],
                          cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp / "out" / out_name) as fh:
        return proc.stdout, [json.loads(line) for line in fh]
