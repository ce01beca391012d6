"""One call on a GPU machine: the gpu test tier, verify, and the benchmark run.

``make gpu OUT=$OUT`` uses the machine's own ``python3`` (torch and triton preinstalled).
Everything lands under ``--out``: ``pytest_gpu.log``, ``verify.log``, ``bench.log`` and the
result files (``<device>.json`` and CSVs) to commit under ``benchmarks/results/``.
"""
import argparse
import os
import subprocess
import sys


def run(cmd, log):
    print("$", " ".join(cmd), flush=True)
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        fh.write(proc.stdout)
    print(proc.stdout[-3000:], flush=True)
    return proc.returncode


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    codes = {
        "pytest_gpu": run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu.py",
                           "-p", "no:cacheprovider"], os.path.join(args.out, "pytest_gpu.log")),
        "verify": run([sys.executable, "-m", "qgoft_kernels", "verify"], os.path.join(args.out, "verify.log")),
        "bench": run([sys.executable, "-m", "benchmarks.run", "--out", args.out], os.path.join(args.out, "bench.log")),
    }
    print("exit codes:", codes)
    return max(codes.values())


if __name__ == "__main__":
    sys.exit(main())
