"""The long GPU job, for a machine with time: the gpu test tier, verify, and the benchmark run.

``make gpu OUT=$OUT`` uses the machine's own ``python3`` (torch and triton preinstalled).
Everything lands under ``--out``: ``pytest_gpu.log``, ``verify.log``, ``bench.log`` and the
result files (``<device>.json`` and CSVs) to commit under ``benchmarks/results/``. It compiles
about 217 kernel specialisations plus PEFT BOFT's CUDA extension: more than one 10-minute
call. ``--steps`` runs a part per call; the compile cache (``TRITON_CACHE_DIR``, by default
the repository's ignored ``.triton-cache/``) carries over between calls. On a lent machine
with 15 minutes, run ``make gpu-quick`` instead (:mod:`benchmarks.gpu_quick`).

Without CUDA it stops at once: the tests would skip, ``verify`` would fall back to the
interpreter and the benchmark to the CPU plan, all reported as success.
"""
import argparse
import os
import subprocess
import sys

from .provenance import TRITON_CACHE, require_cuda

STEPS = ("tests", "verify", "bench")


def run(cmd, log):
    print("$", " ".join(cmd), flush=True)
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        fh.write(proc.stdout)
    print(proc.stdout[-3000:], flush=True)
    return proc.returncode


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated, from {','.join(STEPS)}")
    args = parser.parse_args(argv)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    if set(steps) - set(STEPS):
        parser.error(f"--steps takes {','.join(STEPS)}, got {args.steps!r}")
    if not require_cuda("make gpu"):
        return 2
    os.environ.setdefault("TRITON_CACHE_DIR", TRITON_CACHE)
    os.makedirs(args.out, exist_ok=True)
    commands = {
        "tests": [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu.py", "-p", "no:cacheprovider"],
        "verify": [sys.executable, "-m", "qgoft_kernels", "verify"],
        "bench": [sys.executable, "-m", "benchmarks.run", "--out", args.out],
    }
    logs = {"tests": "pytest_gpu.log", "verify": "verify.log", "bench": "bench.log"}
    codes = {step: run(commands[step], os.path.join(args.out, logs[step])) for step in steps}
    print("exit codes:", codes)
    return max(codes.values())


if __name__ == "__main__":
    sys.exit(main())
