"""First kernel timings: forward and backward of givens_rotate against torch.clone.

bf16 activations, fp32 parameters, quasi blocks with scale; times with
``triton.testing.do_bench`` (median and 20/80% quantiles, in ms). Every shape is first
checked against the float64 oracle; a shape that fails prints no timing.
"""
import argparse
import json
import platform
import subprocess

import torch
import triton
import triton.testing

import qgoft_kernels as qk
from qgoft_kernels.verify import Case, check_case


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=200, quantiles=[0.5, 0.2, 0.8])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--rows", type=int, default=16384)
    parser.add_argument("--dims", type=int, nargs="+", default=[1024, 4096, 8192])
    args = parser.parse_args()
    dev = torch.device("cuda")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    meta = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "commit": commit or "unknown", "rows": args.rows,
            "dtype": "bfloat16", "params": "float32 quasi blocks + scale"}
    rows = []
    for d in args.dims:
        check = check_case(Case(d, 2048, "quasi", True, False, torch.bfloat16), dev)
        ok = all(r[2] for r in check.values())
        entry = {"d": d, "correct": ok, "errors": {k: v[0] for k, v in check.items()}}
        if ok:
            x = torch.randn(args.rows, d, device=dev, dtype=torch.bfloat16)
            params = (torch.eye(2, device=dev) + 0.1 * torch.randn(d - 1, 2, 2, device=dev)).requires_grad_()
            scale = (1 + 0.1 * torch.randn(d, device=dev)).requires_grad_()
            xg = x.clone().requires_grad_()
            y = qk.givens_rotate(xg, params, block="quasi", scale=scale)
            dy = torch.randn_like(y)
            entry["clone_ms"] = bench(lambda: torch.clone(x))
            entry["fwd_ms"] = bench(lambda: qk.givens_rotate(x, params.detach(), block="quasi", scale=scale.detach()))
            entry["bwd_ms"] = bench(lambda: torch.autograd.grad(y, (xg, params, scale), dy, retain_graph=True))
            entry["bytes_clone"] = 2 * x.numel() * x.element_size()
        rows.append(entry)
        print(json.dumps(entry), flush=True)
    with open(args.out, "w") as fh:
        json.dump({"meta": meta, "results": rows}, fh, indent=1)
    print(f"{'d':>6} {'clone ms':>9} {'fwd ms':>8} {'fwd/clone':>9} {'bwd ms':>8} {'bwd/clone':>9}")
    for e in rows:
        if e["correct"]:
            c, f, b = e["clone_ms"][0], e["fwd_ms"][0], e["bwd_ms"][0]
            print(f"{e['d']:>6} {c:>9.4f} {f:>8.4f} {f / c:>9.2f} {b:>8.4f} {b / c:>9.2f}")
        else:
            print(f"{e['d']:>6} FAILED correctness: {e['errors']}")


if __name__ == "__main__":
    main()
