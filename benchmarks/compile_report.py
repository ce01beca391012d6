"""Compile the kernels for a GPU target without a GPU and report their resources.

    python benchmarks/compile_report.py [--arch 90] [--dims 1024 4096 16384]

Uses Triton's compiler and the ptxas it ships with: for every kernel variant it prints
registers per thread, the stack frame (spilled values) and the number of layout
conversions in the TTGIR. This
is the cheap first look before spending GPU minutes (docs/tuning.md).
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile

import triton
import triton.backends.nvidia as nvidia
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from qgoft_kernels.kernels.backward import _givens_bwd_kernel, _givens_bwd_roots_kernel
from qgoft_kernels.kernels.forward import _givens_fwd_kernel
from qgoft_kernels.kernels.launch import backward_config, forward_config, tile_config

CUOBJDUMP = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
FWD_SIG = dict(x="*bf16", y="*bf16", coefs="*fp32", scale="*fp32", offsets="*i32", n_rows="i32",
               d="i32", stride_x="i32", stride_y="i32")
BWD_SIG = dict(x="*bf16", dy="*bf16", dx="*bf16", roots="*fp32", coefs="*fp32", scale="*fp32", offsets="*i32",
               dparams="*fp32", dscale="*fp32", n_rows="i32", d="i32", stride_x="i32", stride_dy="i32",
               stride_dx="i32", n_params="i32")
ROOTS_SIG = {k: v for k, v in BWD_SIG.items() if k not in ("scale", "dscale")}


def resources(kernel, signature, constexprs, num_warps, arch):
    """Registers per thread, stack frame bytes (spills) and layout conversions of one variant."""
    sig = dict(signature, **{k: "constexpr" for k in constexprs})
    compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constexprs),
                              target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as fh:
            fh.write(compiled.asm["cubin"])
        usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", cubin], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    return int(found.group(1)), int(found.group(2)), compiled.asm["ttgir"].count("convert_layout")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--dims", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--rows", type=int, default=16384)
    parser.add_argument("--kernels", nargs="+", default=["fwd", "bwd"], choices=["fwd", "bwd"])
    args = parser.parse_args()
    print(f"triton {triton.__version__}, sm_{args.arch}; launch configs from the GPU heuristics "
          f"(QGOFT_* variables pin them)")
    print(f"{'kernel':<10}{'D':>7}{'chunk':>6}{'BN':>4}{'warps':>6}  "
          f"{'variant':<16}{'regs':>5}{'stack B':>9}{'cvt':>5}")
    for d in args.dims:
        L = (d - 1).bit_length()
        for name in args.kernels:
            cfg = (forward_config if name == "fwd" else backward_config)(1 << L, args.rows, _CUDA)
            LC = cfg.chunk.bit_length() - 1
            kernels = [(name, {"fwd": _givens_fwd_kernel, "bwd": _givens_bwd_kernel}[name],
                        {"fwd": FWD_SIG, "bwd": BWD_SIG}[name], cfg)]
            if name == "bwd" and L > LC:
                kernels.append(("bwd-roots", _givens_bwd_roots_kernel, ROOTS_SIG,
                                tile_config(1 << (L - LC), args.rows, _CUDA, tile=2048)))
            for label, kernel, sig, kcfg in kernels:
                for quasi in (False, True):
                    for transpose in (False, True):
                        consts = dict(L=L, LC=LC, BLOCK_N=kcfg.block_n, QUASI=quasi, TRANSPOSE=transpose,
                                      ACC=tl.float32, ROUND_BF16=False)
                        if label != "bwd-roots":
                            consts["HAS_SCALE"] = True
                        if label.startswith("bwd"):
                            consts.update(HAS_DX=True, HAS_DPARAMS=True)
                        if label == "bwd":
                            consts["HAS_DSCALE"] = True
                        regs, stack, cvt = resources(kernel, sig, consts, kcfg.num_warps, args.arch)
                        variant = f"{'quasi' if quasi else 'givens'}+scale{' T' if transpose else ''}"
                        print(f"{label:<10}{1 << L:>7}{cfg.chunk:>6}{kcfg.block_n:>4}{kcfg.num_warps:>6}  "
                              f"{variant:<16}{regs:>5}{stack:>9}{cvt:>5}", flush=True)


class _CudaDevice:
    type = "cuda"


_CUDA = _CudaDevice()


if __name__ == "__main__":
    main()
