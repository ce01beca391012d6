"""Where each formulation of the PyTorch path wins: ``python -m benchmarks.crossover``.

``backend="torch"`` computes ``x @ R`` either by stage sweeps over the activations or by
``R``'s dense factors (blocks of width ``b``, or the whole ``R``) and BLAS
(``qgoft_kernels/torch_path.py``). This times both on the machine at hand, over a grid of
widths ``d`` and row counts, for a training pass (forward and backward: ``dx``, the
parameters' and the scale's gradients) and an inference forward, every candidate in the
same interleaved rounds (:func:`benchmarks.timing.interleaved_ms`). Every candidate is first
checked against the float64 oracle. The result (``benchmarks/results/crossover-<device>.json``)
is what :func:`qgoft_kernels.torch_path.choose` encodes; ``python -m benchmarks.report``
copies its table into docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import torch

import qgoft_kernels as qk
from qgoft_kernels.dense import rotate_dense
from qgoft_kernels.schedule import num_stages
from qgoft_kernels.sweeps import rotate_sweeps
from qgoft_kernels.torch_path import choose
from qgoft_kernels.verify import Case, check_case

from .environ import scoped
from .run import CPU_PLAN, LATEST, metadata, slug
from .timing import interleaved_ms, wait_for_quiet

DIMS = (16, 64, 256, 384, 1024, 4096, 8192, 16384)
ROWS = (1, 4, 16, 64, 128, 1280, 8192)
WIDTHS = (8, 16, 32, 64, 128)
#: Largest ``rows * d`` timed (a 128 MiB fp32 activation).
MAX_ELEMENTS = 1 << 25
QUICK = ((16, 64), (1, 128), (8, 32))


def candidates(d: int, rows: int, widths) -> dict:
    """``{name: (QGOFT_TORCH_PATH, QGOFT_DENSE_BLOCK)}``: the sweeps, dense blocks of each width
    below ``2**L``, and the whole dense ``R`` where ``rows * 4**L`` stays moderate."""
    D = 1 << num_stages(d)
    out = {"sweeps": ("sweeps", "")}
    out.update({f"dense b={b}": ("dense", str(b)) for b in widths if b < D})
    if max(rows, 64) * D * D <= 1 << 34:
        out["dense R"] = ("dense", str(D))
    return out


def measure(d: int, rows: int, widths, budget_s: float, quiet: float | None = None) -> list[dict]:
    gen = torch.Generator().manual_seed(d * 7919 + rows)
    n = qk.num_pairs(d)
    params = (torch.eye(2).expand(n, 2, 2) + 0.1 * torch.randn(n, 2, 2, generator=gen)).requires_grad_()
    scale = (1 + 0.1 * torch.randn(d, generator=gen)).requires_grad_()
    x = torch.randn(rows, d, generator=gen).requires_grad_()
    dy = torch.randn(rows, d, generator=gen)
    fns, correct = {}, {}
    for name, (path, width) in candidates(d, rows, widths).items():
        with scoped({"QGOFT_TORCH_PATH": path, "QGOFT_DENSE_BLOCK": width}):
            res = check_case(Case(d, 37, "quasi", True, False, torch.float32), "cpu", backend="torch")
        correct[name] = all(r[2] for r in res.values())
        if not correct[name]:
            continue
        if path == "sweeps":
            rotate = rotate_sweeps
        else:
            rotate = functools.partial(rotate_dense, block_width=int(width))

        def train(rotate=rotate):
            torch.autograd.grad(rotate(x, params, block="quasi", scale=scale), (x, params, scale), dy)

        def infer(rotate=rotate):
            with torch.no_grad():
                rotate(x, params, block="quasi", scale=scale)

        fns[(name, "train")] = train
        fns[(name, "infer")] = infer
    if quiet is not None:
        wait_for_quiet(quiet)
    timed = interleaved_ms({f"{k[0]}|{k[1]}": f for k, f in fns.items()}, budget_s=budget_s)
    out = []
    for name, ok in correct.items():
        for pass_name in ("train", "infer"):
            t = timed["times"].get(f"{name}|{pass_name}")
            out.append({"d": d, "rows": rows, "formulation": name, "pass": pass_name, "correct": ok,
                        "ms": None if t is None else {k: v for k, v in t.items() if k != "samples"},
                        "load": timed["load"], "others_busy": timed["others_busy"]})
    return out


def table(result: dict) -> str:
    """Per ``(d, rows)``: the sweeps' time, the best dense candidate's, their ratio, and the rule's pick."""
    lines = [f"Formulations of the PyTorch path ({result['meta']['device']}; torch {result['meta']['torch']}; "
             f"commit {result['meta']['commit']}): fp32, quasi blocks + scale, median ms of the training pass "
             f"(forward + backward: dx, blocks, scale) and of the inference forward, every candidate in the same "
             f"interleaved rounds; 1-minute load average {result['meta']['load']}, CPUs busy with other work "
             f"while timing {result['meta'].get('others_busy', 'unknown')}.", "",
             "| d | rows | pass | sweeps ms | best dense | dense ms | sweeps / best dense | rule picks "
             "| other CPUs busy |",
             "|---|---|---|---|---|---|---|---|---|"]
    points = sorted({(r["d"], r["rows"]) for r in result["rows"]})
    for d, rows in points:
        for pass_name in ("train", "infer"):
            sub = [r for r in result["rows"] if (r["d"], r["rows"], r["pass"]) == (d, rows, pass_name)]
            sweeps = next((r for r in sub if r["formulation"] == "sweeps" and r["ms"]), None)
            dense = [r for r in sub if r["formulation"] != "sweeps" and r["ms"]]
            if not sweeps or not dense or not all(r["correct"] for r in sub):
                lines.append(f"| {d} | {rows} | {pass_name} | FAILED CHECK | | | | | |")
                continue
            best = min(dense, key=lambda r: r["ms"]["median"])
            s, b = sweeps["ms"]["median"], best["ms"]["median"]
            busy = sweeps.get("others_busy")
            lines.append(f"| {d} | {rows} | {pass_name} | {s:.3f} | {best['formulation']} | {b:.3f} | {s / b:.2f} "
                         f"| {choose(d, rows, pass_name == 'train')} | {'-' if busy is None else f'{busy:.2f}'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.crossover", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny grid (writes nothing unless --out)")
    parser.add_argument("--dims", type=int, nargs="+", default=None)
    parser.add_argument("--rows", type=int, nargs="+", default=None)
    parser.add_argument("--budget", type=float, default=20.0, help="seconds per (d, rows) point at most")
    parser.add_argument("--out", default=None, help=f"folder for the result (default {os.path.relpath(LATEST)}, "
                        "ignored by git; make bench-publish commits it)")
    parser.add_argument("--quiet", type=float, default=None, metavar="CPUS",
                        help="before each point, wait (up to 10 min) until other processes use at most CPUS cores")
    args = parser.parse_args(argv)
    device = torch.device("cpu")
    dims, rows_list, widths = QUICK if args.quick else (DIMS, ROWS, WIDTHS)
    dims, rows_list = args.dims or dims, args.rows or rows_list
    start = time.time()
    result = {"meta": metadata(device, CPU_PLAN), "rows": []}
    for d in dims:
        for rows in rows_list:
            if rows * d > MAX_ELEMENTS:
                continue
            result["rows"] += measure(d, rows, widths, 2.0 if args.quick else args.budget, args.quiet)
            print(f"d={d} rows={rows} done ({time.time() - start:.0f} s)", flush=True)
    loads = [v for r in result["rows"] for v in r["load"]]
    busy = [r["others_busy"] for r in result["rows"] if r.get("others_busy") is not None]
    result["meta"]["load"] = f"{min(loads):.2f} to {max(loads):.2f}"
    result["meta"]["others_busy"] = f"{min(busy):.2f} to {max(busy):.2f}" if busy else "unknown"
    result["meta"]["wall_seconds"] = round(time.time() - start, 1)
    print(table(result))
    if not args.quick or args.out:
        out = args.out or LATEST
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, f"crossover-{slug(device)}.json")
        with open(path, "w") as fh:
            json.dump(result, fh, indent=1)
        print("wrote", os.path.relpath(path))
    return 0 if all(r["correct"] for r in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
