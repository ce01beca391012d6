"""Correctness checks anyone can run: ``python -m qgoft_kernels verify``.

Every kernel path (block kind x scale x direction x dtype) runs on fresh random inputs and
is compared, output and every gradient, with a float64 oracle: the dense ``givens_matrix``
(``d <= DENSE_MAX``) or, above that, the stage-wise reference in float64. The tests use
the same helpers, so the tolerance rule (``docs/method.md`` §4) lives here once.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

import torch

from .checks import triton_available
from .function import givens_rotate
from .reference import blocks_from_params, givens_matrix, rotate_reference
from .schedule import num_pairs

#: Largest ``d`` for which the oracle is the dense float64 ``R``.
DENSE_MAX = 2048
#: fp32 (IEEE) bound on ``||out - ref|| / ||ref||``; float64 inputs get a tighter one.
RTOL = {torch.float32: 1e-5, torch.float64: 1e-10}
#: Rounding allowance against the magnitudes: a result that is a sum with heavy cancellation
#: (a parameter gradient summed over rows, say) cannot be right to ``RTOL`` relative to its
#: small value; its error is held to ``MAG_RTOL`` of ``||same computation on |inputs|||``.
MAG_RTOL = {torch.float32: 1e-6, torch.float64: 1e-13}
#: Low precision: at most ``LOW_FACTOR`` x the PyTorch reference's own error, plus ``LOW_ATOL``.
LOW_FACTOR, LOW_ATOL = 2.0, 1e-5
#: The default bound of :func:`assert_close` per dtype of the result checked: ``RTOL`` for
#: fp32/fp64; for bf16/fp16, where no reference in the same dtype is at hand, about four units
#: of the dtype's rounding (one rounding of the output costs about one).
TOLERANCE = {**RTOL, torch.bfloat16: 1e-2, torch.float16: 2e-3}


@dataclass
class Case:
    d: int
    rows: int
    block: str
    scale: bool
    transpose: bool
    dtype: torch.dtype

    @property
    def id(self) -> str:
        return (f"d{self.d}-n{self.rows}-{self.block}{'-scale' if self.scale else ''}"
                f"{'-T' if self.transpose else ''}-{str(self.dtype).removeprefix('torch.')}")


def random_inputs(case: Case, device, generator: torch.Generator | None = None):
    """Fresh random ``x`` (in ``case.dtype``), ``params``/``scale`` (float32) and ``dy``.

    Blocks are the identity plus noise of norm ~0.3, so that products over many stages
    keep their scale; angles are uniform in ``[-pi, pi]``.
    """
    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=generator, device="cpu", dtype=dtype).to(device)

    n = num_pairs(case.d)
    if case.block == "givens":
        params = (torch.rand(n, generator=generator) * 2 - 1).mul(torch.pi).to(device)
    else:
        params = torch.eye(2).expand(n, 2, 2).to(device) + 0.3 * randn(n, 2, 2)
    scale = 1 + 0.3 * randn(case.d) if case.scale else None
    x = randn(case.rows, case.d).to(case.dtype)
    dy = randn(case.rows, case.d).to(case.dtype)
    return x, params, scale, dy


def _run(x, params, scale, dy, case: Case, backend: str):
    x = x.detach().requires_grad_()
    params = params.detach().requires_grad_()
    scale = scale.detach().requires_grad_() if scale is not None else None
    y = givens_rotate(x, params, block=case.block, scale=scale, transpose=case.transpose, backend=backend)
    y.backward(dy)
    return _collect(y, x, params, scale)


def _collect(y, x, params, scale) -> dict:
    # an input the result does not depend on (the empty params of d = 1) has no .grad
    grads = {name: t.grad if t.grad is not None else torch.zeros_like(t)
             for name, t in (("dx", x), ("dparams", params), ("dscale", scale)) if t is not None}
    return {"y": y.detach(), **grads}


def oracle(x, params, scale, dy, case: Case, chunk: int = 4096):
    """Output and gradients in float64 from the same (rounded) inputs.

    Rows go through in chunks (the parameter gradients summed over them), so the float64
    intermediates stay small at GPU sizes.
    """
    p64 = params.detach().double().requires_grad_()
    s64 = scale.detach().double().requires_grad_() if scale is not None else None
    R = None
    if case.d <= DENSE_MAX:
        R = givens_matrix(case.d, p64, block=case.block, scale=s64)
        R = R.T if case.transpose else R
    ys, dxs, loss = [], [], 0
    for start in range(0, max(x.shape[0], 1), chunk):
        x64 = x[start:start + chunk].detach().double().requires_grad_()
        if R is not None:
            y = x64 @ R
        else:
            y = rotate_reference(x64, p64, block=case.block, scale=s64, transpose=case.transpose)
        (dx,) = torch.autograd.grad(y, x64, dy[start:start + chunk].double(), retain_graph=True)
        loss = loss + (y * dy[start:start + chunk].double()).sum()
        ys.append(y.detach())
        dxs.append(dx)
    leaves = [t for t in (p64, s64) if t is not None]
    grads = torch.autograd.grad(loss, leaves, allow_unused=True) if torch.is_tensor(loss) else [None] * len(leaves)
    out = {"y": torch.cat(ys), "dx": torch.cat(dxs)}
    for name, t, g in zip(("dparams", "dscale"), leaves, grads):
        out[name] = g if g is not None else torch.zeros_like(t)
    return out


def magnitudes(x, params, scale, dy, case: Case) -> dict:
    """The oracle on absolute values: per element, an upper bound on the sum of the absolute
    terms each result adds up (every result is a polynomial in the inputs and blocks)."""
    B = blocks_from_params(params.detach().double(), case.block)
    quasi = Case(case.d, case.rows, "quasi", case.scale, case.transpose, case.dtype)
    mag = oracle(x.abs(), B.abs(), None if scale is None else scale.abs(), dy.abs(), quasi)
    if case.block == "givens":
        # dtheta = sum(dB * dB/dtheta), dB/dtheta = [[-sin, -cos], [cos, -sin]]
        s, c = torch.sin(params.double()).abs(), torch.cos(params.double()).abs()
        weights = torch.stack((torch.stack((s, c), -1), torch.stack((c, s), -1)), -2)
        mag["dparams"] = (mag["dparams"] * weights).sum((-2, -1))
    return mag


def rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """``||got - ref|| / ||ref||`` in float64; NaN anywhere gives ``inf``."""
    got, ref = got.double(), ref.double()
    if got.numel() == 0:
        return 0.0
    if not torch.isfinite(got).all():
        return float("inf")
    denom = ref.norm().item()
    diff = (got - ref).norm().item()
    return diff / denom if denom > 0 else diff


def describe_mismatch(got: torch.Tensor, ref: torch.Tensor, limit: int = 5) -> str:
    """Max/mean absolute error and the first mismatching indices, for a failure message."""
    got, ref = got.double().cpu(), ref.double().cpu()
    err = (got - ref).abs()
    err = torch.where(torch.isnan(err), torch.full_like(err, float("inf")), err)
    if err.numel() == 0:
        return "empty"
    bad = (err > 1e-3 * ref.abs().max().clamp_min(1e-30)).nonzero()[:limit].tolist()
    return f"max abs err {err.max().item():.3e}, mean {err.mean().item():.3e}, first mismatches at {bad}"


def assert_close(got, ref, *, rtol: float | None = None, atol: float | None = None, name: str = "result") -> None:
    """Assert that ``got`` matches ``ref``: the one comparison of the tests.

    Passes when ``rel_error(got, ref) <= rtol``, by default ``TOLERANCE[got.dtype]``, and,
    when ``atol`` is given, every element is also within ``atol`` of ``ref``. A test passes
    ``rtol`` to be stricter than its dtype's default, or looser where the result went through
    several low-precision operations (autocast), saying why. The failure message gives the
    errors, the bound and the first mismatching indices.
    """
    got, ref = torch.as_tensor(got), torch.as_tensor(ref)
    assert tuple(got.shape) == tuple(ref.shape), f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    bound = TOLERANCE.get(got.dtype, RTOL[torch.float32]) if rtol is None else rtol
    err = rel_error(got, ref)
    problems = [f"relative error {err:.3e} > {bound:.3e}"] if not err <= bound else []
    if atol is not None and got.numel():
        worst = (got.double() - ref.double()).abs().nan_to_num(float("inf")).max().item()
        if not worst <= atol:
            problems.append(f"max abs error {worst:.3e} > atol {atol:.3e}")
    assert not problems, f"{name} ({got.dtype}): {'; '.join(problems)} ({describe_mismatch(got, ref)})"


def tolerance(name: str, dtype: torch.dtype, low_ref: dict | None, ref: dict, mag: dict) -> float:
    """The bound on :func:`rel_error` for one result of ``dtype``.

    fp32/fp64: ``RTOL``, or the rounding allowance ``MAG_RTOL * ||mag|| / ||ref||`` where
    cancellation makes that larger. Below fp32: ``LOW_FACTOR`` x the error of the PyTorch
    path in the same dtype, plus ``LOW_ATOL``.
    """
    if dtype in RTOL:
        ref_norm = ref[name].double().norm().item()
        allowance = MAG_RTOL[dtype] * mag[name].double().norm().item()
        return max(RTOL[dtype], allowance / ref_norm if ref_norm > 0 else allowance)
    return LOW_FACTOR * rel_error(low_ref[name], ref[name]) + LOW_ATOL


def check_case(case: Case, device, backend: str = "triton", generator=None):
    """Run one case; return ``{name: (error, bound, ok, detail)}`` for the output and each gradient."""
    x, params, scale, dy = random_inputs(case, device, generator)
    ref = oracle(x, params, scale, dy, case)
    mag = magnitudes(x, params, scale, dy, case)
    tri = _run(x, params, scale, dy, case, backend)
    low_ref = None if case.dtype in RTOL else _run(x, params, scale, dy, case, "torch")
    result = {}
    for name, ref_t in ref.items():
        tri_t = tri[name]
        if tuple(tri_t.shape) != tuple(ref_t.shape):
            result[name] = (float("inf"), 0.0, False, f"shape {tuple(tri_t.shape)} != {tuple(ref_t.shape)}")
            continue
        err, bound = rel_error(tri_t, ref_t), tolerance(name, tri_t.dtype, low_ref, ref, mag)
        ok = err <= bound
        result[name] = (err, bound, ok, "" if ok else describe_mismatch(tri_t, ref_t))
    return result


def assert_case_ok(case: Case, device, generator=None) -> None:
    """:func:`check_case`, raising ``AssertionError`` with the details of every failure."""
    bad = {n: r for n, r in check_case(case, device, generator=generator).items() if not r[2]}
    assert not bad, f"{case.id}: " + "; ".join(f"{n}: error {e:.3e} > bound {b:.3e} ({detail})"
                                               for n, (e, b, _, detail) in bad.items())


def default_cases(device: torch.device) -> list[Case]:
    """The verification matrix: every path at small sizes, then the large sizes on a GPU.

    Each distinct case compiles its own kernels on a GPU, so the matrix is sized to finish
    in a few minutes there.
    """
    combos = list(itertools.product(("givens", "quasi"), (False, True), (False, True)))
    if device.type == "cuda":
        small = [Case(d, 1000, b, s, t, dt) for d in (1, 3, 100, 768)
                 for (b, s, t) in combos for dt in (torch.float32, torch.bfloat16)]
        fp16 = [Case(100, 1000, "quasi", True, t, torch.float16) for t in (False, True)]
        large = [Case(d, 4096, "quasi", True, t, torch.bfloat16) for d in (4096, 11008, 16384) for t in (False, True)]
        return small + fp16 + large + [Case(28672, 2048, "quasi", True, False, torch.bfloat16)]
    return [Case(d, 37, b, s, t, dt) for d in (1, 2, 3, 17, 100, 257)
            for (b, s, t) in combos for dt in (torch.float32, torch.bfloat16)]


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m qgoft_kernels verify",
                                     description="check every kernel path against a float64 oracle")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: fresh)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend = "triton" if triton_available() else "torch"
    if backend == "torch":
        print("triton is not installed (it has Linux wheels only): checking the PyTorch path instead of the kernels")
    elif device.type == "cpu":
        print("no CUDA device: running the Triton kernels in the interpreter (TRITON_INTERPRET=1), small sizes")
    os.environ["QGOFT_POISON"] = "1"
    seed = args.seed if args.seed is not None else torch.seed() % 2**31
    generator = torch.Generator().manual_seed(seed)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    where += "" if device.type == "cuda" or backend == "torch" else " (Triton interpreter)"
    print(f"device: {where}; torch {torch.__version__}; seed {seed}")
    names = ("y", "dx", "dparams", "dscale")
    print(f"{'case':<40}" + "".join(f"{n:>11}" for n in names) + "  result")
    failed = 0
    for case in default_cases(device):
        result = check_case(case, device, backend=backend, generator=generator)
        ok = all(r[2] for r in result.values())
        failed += not ok
        cells = "".join(f"{result[n][0]:>11.2e}" if n in result else f"{'-':>11}" for n in names)
        print(f"{case.id:<40}{cells}  {'PASS' if ok else 'FAIL'}", flush=True)
        for n, (err, bound, good, detail) in result.items():
            if not good:
                print(f"    {n}: error {err:.3e} > bound {bound:.3e}; {detail}")
    total = len(default_cases(device))
    print(f"{total - failed}/{total} cases pass (fp32: rel err <= {RTOL[torch.float32]:g}, or <= "
          f"{MAG_RTOL[torch.float32]:g} of the magnitudes where a sum cancels; "
          f"bf16/fp16: <= {LOW_FACTOR:g}x the PyTorch path's error + {LOW_ATOL:g})")
    return 1 if failed else 0
