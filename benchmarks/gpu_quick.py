"""A GPU run sized for a lent machine: ``make gpu-quick OUT=<folder> [COMMIT=<sha>]``.

One command of at most 7 minutes on an H100/H200, so that a second run still fits a
15-minute lease (docs/tuning.md). It installs nothing and runs the machine's ``python3``.

1. Compile: every kernel specialisation that will be timed, in a pool of spawned worker
   processes sharing ``TRITON_CACHE_DIR``, one unit (kernel path, d, block) per task. A
   worker launches its unit once at the timed shape: the JIT specialises on the sizes and
   strides (divisibility by 16) and the launcher picks its config from them, so this compiles
   exactly what will be timed. It checks that launch (every element written, 256 of its rows
   against float64) and 256 fresh rows, outputs and every gradient, against the float64
   oracle with the tolerances of :mod:`qgoft_kernels.verify`.
   A mixed batch (``mixed``: 64 adapters stacked, each row with its own, in runs) is checked
   row by row against the float64 oracle of the row's adapter, and its base rows bit for bit.
2. Time, in this process from the warm cache: ``triton.testing.do_bench`` (CUDA events, L2
   flushed). Each group times ``torch.clone`` of the same tensor, then every configuration;
   the group runs twice, so every configuration (the launchers' default) is timed twice
   and the two give the noise level. A unit that failed its check gets no timing.

Every compile result and measurement is one JSON line appended to ``OUT/gpu-quick.jsonl``
and flushed as soon as it is taken, so a run cut short still returns data. The table comes
last (``--table FILE`` prints it again from a file). Next to each measured ratio stands the
static model's prediction from ``benchmarks/results/sass-sm90.json`` when that file exists.

Without CUDA the command stops at once (exit 2). ``--dry-run`` is the rehearsal on a CPU: the
same pipeline under ``TRITON_INTERPRET=1`` at tiny shapes, a wall clock standing in for
``do_bench``, every line marked ``device_type: cpu``, ``dry_run: true``. It is never GPU data.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import random
import sys
import time
import traceback
from dataclasses import asdict, dataclass

import torch

import qgoft_kernels as qk
from qgoft_kernels.ops import launch_backward, launch_forward
from qgoft_kernels.verify import RTOL, Case, magnitudes, oracle, random_inputs, rel_error, tolerance

from .methods import make_linear, methods, peft_version, trainable_parameters
from .provenance import TRITON_CACHE, commit_id, driver_version, interpreter_problem, require_cuda
from .run import RESULTS, check_layer, perturb
from .timing import peak_bytes, saved_bytes

OUT_NAME = "gpu-quick.jsonl"
SCHEMA = "gpu-quick/2"


def default_predictions() -> str:
    """The static model's rows for the installed triton: its 3.6 file (the GPU machines') or the main one."""
    import triton

    name = "sass-sm90-triton3.6.json" if triton.__version__.startswith("3.6") else "sass-sm90.json"
    return os.path.join(RESULTS, name)


def mixed_predictions(path: str) -> str:
    """The static model's mixed-batch rows beside ``path`` (``sass-sm90-mixed[-triton3.6].json``)."""
    folder, name = os.path.split(path)
    return os.path.join(folder, name.replace("sass-sm90", "sass-sm90-mixed", 1))


def card_of(device_name: str) -> str | None:
    """The static model's card for a CUDA device name, or ``None`` for a card it does not price."""
    for token, card in (("H200", "H200"), ("H100", "H100-SXM")):
        if token in device_name:
            return card
    return None
#: ``(block, scale)``: qGOFT with its scale, and strict GOFT.
VARIANTS = (("quasi", True), ("givens", False))
#: The layer step's methods, by their names in :func:`benchmarks.methods.methods`.
LAYER_METHODS = ("frozen nn.Linear", "qGOFT quasi+scale", "GOFT givens", "PEFT LoRA r=16", "PEFT OFT b=32")
#: What ``--only`` selects, in the order timed (the first ones matter most if time runs out).
KINDS = ("forward", "backward", "layer", "merge", "forward_t", "mixed")
#: Every line has exactly these keys (``None`` where one does not apply).
FIELDS = ("schema", "run_id", "dry_run", "device", "device_type", "driver", "cuda", "torch", "triton", "python",
          "numpy", "peft", "commit", "commit_source", "timer", "env_pins",
          "kind", "method", "d", "rows", "dtype", "block", "scale", "repeat", "ok", "median_ms", "q20_ms", "q80_ms",
          "bytes", "gbps", "ratio", "ratio_to", "predicted_ratio", "predicted_opt", "predicted_card", "target",
          "config", "trainable",
          "saved_bytes_above", "peak_bytes_above", "seconds", "errors", "note")
REPEATS = 2


@dataclass(frozen=True)
class Plan:
    dims: tuple[int, ...]  # kernel widths d
    rows: int  # rows of the kernel timings
    merge_dim: int  # the merged weight is merge_dim x merge_dim
    layer_dim: int  # the layer is layer_dim -> layer_dim
    tokens: int  # rows of the layer step
    mixed_dim: int = 4096  # the mixed batch's width ...
    mixed_adapters: int = 64  # ... its adapters ...
    mixed_runs: tuple[int, ...] = (16, 1)  # ... and the rows of one adapter in a row (1: random order)
    check_rows: int = 256
    dtype: torch.dtype = torch.bfloat16


GPU_PLAN = Plan(dims=(1024, 2048, 4096, 8192, 11008, 16384), rows=16384, merge_dim=4096, layer_dim=4096,
                tokens=16384)
#: The CPU rehearsal: 16 is divisible by 16, 24 is not; OFT b=32 needs a layer of 32.
DRY_PLAN = Plan(dims=(16, 24), rows=64, merge_dim=24, layer_dim=32, tokens=64, mixed_dim=24, mixed_adapters=3,
                mixed_runs=(4, 1))


@dataclass(frozen=True)
class Unit:
    """One compile-and-check task: a kernel path at one width, block kind and row count."""
    path: str  # "forward" (x @ R), "forward_t" (x @ R^T), "backward" (dx and every parameter gradient), "mixed"
    d: int
    block: str
    scale: bool
    rows: int
    #: the backward without ``dx`` (a layer whose input needs no gradient) is its own kernel
    need_dx: bool = True
    #: a mixed batch's stacked adapters
    adapters: int = 0

    @property
    def name(self) -> str:
        return f"{self.path}:d{self.d}:{variant_name(self.block, self.scale)}:n{self.rows}" + (
            "" if self.need_dx else ":no-dx")


def unit_path(unit: Unit) -> str:
    """The kernel path a compile line names: ``backward:no-dx`` for the backward without ``dx``."""
    return unit.path if unit.need_dx else unit.path + ":no-dx"


def variant_name(block: str, scale: bool) -> str:
    return block + ("+scale" if scale else "")


def target(kind: str, d: int | None) -> float | None:
    """The targets on a ratio: kernels and merge to their clone, the layer to the frozen one."""
    return {"forward": 1.15, "forward_t": 1.15, "backward": 1.8, "merge": 1.5, "merge_kernel": 1.15,
            "layer_step": 1.2, "mixed": 1.2}.get(kind)


# --- the plan -----------------------------------------------------------------------------------

def groups(plan: Plan, only: tuple[str, ...], dims: tuple[int, ...] | None) -> list[tuple]:
    """What is timed, in order: ``(kind, d)`` for kernels, ``("merge", d)``, ``("layer", d)``."""
    out = []
    for kind in KINDS:
        if kind not in only:
            continue
        if kind in ("forward", "backward", "forward_t"):
            out += [(kind, d) for d in plan.dims if dims is None or d in dims]
        elif kind == "merge":
            out.append((kind, plan.merge_dim))
        elif kind == "mixed":
            out.append((kind, plan.mixed_dim))
        else:
            out.append((kind, plan.layer_dim))
    return out


def units_for(group: tuple, plan: Plan) -> list[Unit]:
    """The kernel specialisations a timing group launches."""
    kind, d = group
    if kind == "merge":
        # W R^T over the rows of a d x d weight
        return [Unit("forward_t", d, b, s, d) for b, s in VARIANTS]
    if kind == "layer":
        return [Unit(path, d, b, s, plan.tokens) for path in ("forward", "backward") for b, s in VARIANTS]
    if kind == "mixed":
        return [Unit("mixed", d, b, s, plan.rows, adapters=plan.mixed_adapters) for b, s in VARIANTS]
    return [Unit(kind, d, b, s, plan.rows) for b, s in VARIANTS]


def unit_cost(unit: Unit) -> tuple:
    # longest first, so that the pool ends together: the backward compiles the most code
    return ({"backward": 0, "forward_t": 1, "forward": 2, "mixed": 2}[unit.path], -unit.d)


# --- phase 1: compile and check, one unit per worker task ---------------------------------------

def unit_inputs(unit: Unit, rows: int, device, dtype, generator=None):
    """``(case, (x, params, scale, dy))`` for ``unit``: fresh random inputs (``params``/``scale`` float32)."""
    case = Case(unit.d, rows, unit.block, unit.scale, unit.path == "forward_t", dtype)
    return case, random_inputs(case, device, generator)


def mixed_inputs(unit: Unit, rows: int, adapters: int, run: int, device, dtype, generator=None):
    """``(x, params, scale, batch)`` for a mixed batch: ``adapters`` random adapters stacked
    (as :func:`unit_inputs` draws one), rows in runs of ``run`` of one adapter drawn at random,
    every 16th run of no adapter (``-1``)."""
    one = Unit("forward", unit.d, unit.block, unit.scale, rows)
    drawn = [unit_inputs(one, 1, device, dtype, generator)[1] for _ in range(adapters)]
    params = torch.stack([p for _, p, _, _ in drawn])
    scale = torch.stack([s for _, _, s, _ in drawn]) if unit.scale else None
    picks = torch.randint(0, adapters, (-(-rows // run),), generator=generator)
    picks[::16] = -1
    index = picks.repeat_interleave(run)[:rows]
    x = torch.randn(rows, unit.d, generator=generator).to(device, dtype)
    return x, params, scale, qk.MixedBatch(index, adapters, device=device)


def launch_mixed(unit: Unit, x, params, scale, batch):
    return qk.givens_rotate(x, params, block=unit.block, scale=scale, adapter_index=batch, backend="triton")


def check_mixed(unit: Unit, device, dtype, check_rows: int, generator) -> dict:
    """A mixed batch at the timed shape: ``check_rows`` rows against the float64 oracle of their
    own adapter (``{"y[adapter a]": [error, bound]}``), the base rows bit for bit."""
    x, params, scale, batch = mixed_inputs(unit, unit.rows, unit.adapters, 16, device, dtype, generator)
    y = launch_mixed(unit, x, params, scale, batch)
    index = batch.index.to(device)
    rows = torch.randperm(unit.rows, generator=generator)[:check_rows].to(device)
    errors, base_equal = {}, bool(torch.equal(y[index < 0], x[index < 0]))
    for a in sorted(set(index[rows].tolist()) - {-1}):
        mine = rows[index[rows] == a]
        case = Case(unit.d, len(mine), unit.block, unit.scale, False, dtype)
        dy = torch.randn(len(mine), unit.d, generator=generator).to(device, dtype)
        got = errors_vs_float64(case, x[mine], params[a], None if scale is None else scale[a], dy, {"y": y[mine]})
        errors[f"y[adapter {a}]"] = got["y"]
    return {"errors": errors, "all_written": bool(torch.isfinite(y).all()), "base_rows_equal": base_equal}


def launch_unit(unit: Unit, x, params, scale, dy) -> dict:
    """Run ``unit``'s entry point; its results by the oracle's names (``y``, ``dx``, ...)."""
    if unit.path == "backward":
        dx, dparams, dscale = launch_backward(
            x=x, dy=dy, params=params, scale=scale, block=unit.block, structure="tree", transpose=False,
            need_dx=unit.need_dx, need_dparams=True, need_dscale=scale is not None)
        return {**({"dx": dx} if unit.need_dx else {}), "dparams": dparams,
                **({"dscale": dscale} if scale is not None else {})}
    return {"y": launch_forward(x=x, params=params, scale=scale, block=unit.block, structure="tree",
                                transpose=unit.path == "forward_t")}


def torch_path(case: Case, x, params, scale, dy) -> dict:
    """The PyTorch path in the inputs' dtype: the low-precision tolerance's yardstick."""
    x = x.detach().requires_grad_()
    params = params.detach().requires_grad_()
    scale = scale.detach().requires_grad_() if scale is not None else None
    y = qk.givens_rotate(x, params, block=case.block, scale=scale, transpose=case.transpose, backend="torch")
    y.backward(dy)
    out = {"y": y.detach(), "dx": x.grad, "dparams": params.grad}
    return {**out, "dscale": scale.grad} if scale is not None else out


def errors_vs_float64(case: Case, x, params, scale, dy, got: dict) -> dict:
    """``{name: [error, bound]}`` for each result in ``got`` (docs/method.md §4, as in ``verify``)."""
    ref = oracle(x, params, scale, dy, case)
    mag = magnitudes(x, params, scale, dy, case)
    low = None if x.dtype in RTOL else torch_path(case, x, params, scale, dy)
    return {name: [rel_error(t, ref[name]), tolerance(name, t.dtype, low, ref, mag)] for name, t in got.items()}


class _Done(Exception):
    """A check that finished early (the mixed batch's, which has no fresh-rows part)."""


def check_unit(unit: Unit, device_type: str, dtype_name: str, check_rows: int) -> dict:
    """Worker task: compile ``unit`` at its timed shape, check it; never raises."""
    # every output starts as NaN, so an element the kernel does not write fails the check
    os.environ["QGOFT_POISON"] = "1"
    start = time.perf_counter()
    seed = random.SystemRandom().randrange(2**31)
    result = {"unit": asdict(unit), "seed": seed, "pid": os.getpid(), "ok": False, "errors": {}, "error": None}
    try:
        device, dtype = torch.device(device_type), getattr(torch, dtype_name)
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        if unit.path == "mixed":
            got = check_mixed(unit, device, dtype, check_rows, gen)
            result["errors"] = {"timed_shape_rows": got["errors"], "fresh_rows": {},
                                "timed_shape_all_written": got["all_written"],
                                "base_rows_bit_equal": got["base_rows_equal"]}
            result["ok"] = (got["all_written"] and got["base_rows_equal"] and bool(got["errors"])
                            and all(e <= b for e, b in got["errors"].values()))
            raise _Done
        # the timed shape: the inputs are drawn on the device (fast at 16384 x 16384)
        case, (_, params, scale, _) = unit_inputs(unit, 1, device, dtype, gen)
        x = torch.randn(unit.rows, unit.d, device=device, dtype=dtype)
        dy = torch.randn(unit.rows, unit.d, device=device, dtype=dtype)
        got = launch_unit(unit, x, params, scale, dy)
        finite = all(bool(torch.isfinite(t).all()) for t in got.values())
        # rows are independent in y and dx: 256 of them against float64 (the parameter
        # gradients sum over all rows; they are checked on the fresh rows below)
        idx = torch.randperm(unit.rows, generator=gen)[:check_rows].to(device)
        row_case = Case(unit.d, len(idx), unit.block, unit.scale, case.transpose, dtype)
        row_got = {k: v[idx] for k, v in got.items() if k in ("y", "dx")}
        timed = errors_vs_float64(row_case, x[idx], params, scale, dy[idx], row_got)
        del x, dy, got
        # fresh rows, every result
        case, (x, params, scale, dy) = unit_inputs(unit, check_rows, device, dtype, gen)
        fresh = errors_vs_float64(case, x, params, scale, dy, launch_unit(unit, x, params, scale, dy))
        result["errors"] = {"timed_shape_rows": timed, "fresh_rows": fresh, "timed_shape_all_written": finite}
        result["ok"] = finite and all(e <= b for errs in (timed, fresh) for e, b in errs.values())
    except _Done:
        pass
    except Exception:
        result["error"] = traceback.format_exc(limit=4)[-2000:]
    if device_type == "cuda":
        torch.cuda.empty_cache()
    result["seconds"] = time.perf_counter() - start
    return result


def compile_all(units: list[Unit], dtype: torch.dtype, check_rows: int, device: torch.device, workers: int,
                deadline: float, record) -> dict:
    """Phase 1: ``{unit: ok}``; units still running at ``deadline`` (monotonic) count as failed.

    ``record`` gets one line per unit (kind ``compile``); ``benchmarks.models`` uses this too.
    """
    ok = {}
    ctx = multiprocessing.get_context("spawn")
    pool = ctx.Pool(processes=workers)
    dtype_name = str(dtype).removeprefix("torch.")
    pending = {u: pool.apply_async(check_unit, (u, device.type, dtype_name, check_rows)) for u in units}
    while pending and time.monotonic() < deadline:
        for unit in [u for u, res in pending.items() if res.ready()]:
            res = pending.pop(unit).get()
            ok[unit] = res["ok"]
            note = "check passed" if res["ok"] else ("raised: " + res["error"].strip().splitlines()[-1]
                                                     if res["error"] else "check failed: no timing")
            record(kind="compile", method=unit_path(unit), d=unit.d, rows=unit.rows, dtype=dtype_name,
                   block=unit.block, scale=unit.scale, ok=res["ok"], seconds=round(res["seconds"], 2),
                   errors={**res["errors"], "seed": res["seed"], "pid": res["pid"], "traceback": res["error"]},
                   note=note)
            print(f"  {unit.name:<36} {'ok' if res['ok'] else 'FAILED'}  {res['seconds']:.1f} s", flush=True)
        time.sleep(0.1)
    for unit in pending:
        ok[unit] = False
        record(kind="compile", method=unit_path(unit), d=unit.d, rows=unit.rows, dtype=dtype_name, block=unit.block,
               scale=unit.scale, ok=False, note="not finished by the compile deadline: no timing")
    if pending:
        pool.terminate()
    else:
        pool.close()
    pool.join()
    return ok


# --- phase 2: timing ----------------------------------------------------------------------------

class OutOfTime(Exception):
    pass


class Timer:
    """``do_bench`` on CUDA; on the CPU (dry run) a wall clock over a few calls. Stops at the deadline."""

    def __init__(self, device: torch.device, deadline: float):
        self.device, self.deadline = device, deadline

    @property
    def label(self) -> str:
        if self.device.type == "cuda":
            return "triton.testing.do_bench (CUDA events, L2 flushed; warmup 25 ms, rep 100 ms)"
        return "wall clock, time.perf_counter over 3 calls after 1 warm-up (CPU dry run, not GPU data)"

    def __call__(self, fn, grad_to_none=None) -> dict:
        if time.monotonic() > self.deadline:
            raise OutOfTime
        if self.device.type == "cuda":
            import triton.testing

            median, q20, q80 = triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none,
                                                       quantiles=[0.5, 0.2, 0.8])
            return {"median_ms": median, "q20_ms": q20, "q80_ms": q80}
        times = []
        for _ in range(4):
            for t in grad_to_none or ():
                t.grad = None
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        times = sorted(times[1:])
        return {"median_ms": times[1], "q20_ms": times[0], "q80_ms": times[2]}


def throughput(t: dict, nbytes: int | None) -> dict:
    gbps = None if nbytes is None else nbytes / (t["median_ms"] * 1e-3) / 1e9
    return {**t, "bytes": nbytes, "gbps": gbps}


def launcher_config(path: str, d: int, rows: int, device: torch.device) -> dict | None:
    """The config the launcher picks (vector and chunk widths, rows per block, warps, programs).

    Read from the launcher's heuristics, which may change: ``None`` when that fails.
    """
    try:
        from qgoft_kernels.kernels import launch

        D = 1 << qk.num_stages(d)
        cfg = launch.config("bwd" if path == "backward" else "fwd", D, rows, 2, device)
        return {**asdict(cfg), "chunk": cfg.chunk, "chunks": D // cfg.chunk}
    except Exception:
        return None


def load_predictions(path: str) -> list[dict]:
    """The static model's rows (``kernel``, ``d``, ``dtype``, ``block``, ``default``, ``gpu``,
    ``predicted_over_clone`` and its optimistic and pessimistic figures); ``[]`` when the file
    is missing or unreadable."""
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return []
    if isinstance(data, dict):
        data = data.get("rows", [])
    return [r for r in data if isinstance(r, dict)] if isinstance(data, list) else []


def predicted(rows: list[dict], kernel: str, d: int, dtype: str, block: str, scale: bool,
              card: str | None = None) -> dict:
    """The default config's predicted ratios to clone for one measurement on ``card``:
    ``{"predicted_ratio": pessimistic, "predicted_opt": optimistic, "predicted_card": card}``,
    ``None`` values where the model has no such row (rows without a card match any)."""
    short = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(dtype, dtype)
    for r in rows:
        if (r.get("kernel") == kernel and r.get("d") == d and r.get("dtype") in (dtype, short)
                and r.get("block") in (block, variant_name(block, scale)) and r.get("default", True)
                and r.get("scale", scale) == scale and r.get("predicted_over_clone") is not None
                and (card is None or r.get("gpu", card) == card)):
            return {"predicted_ratio": float(r["predicted_over_clone"]),
                    "predicted_opt": r.get("predicted_over_clone_opt"), "predicted_card": r.get("gpu")}
    return {"predicted_ratio": None, "predicted_opt": None, "predicted_card": None}


def time_kernel(kind: str, d: int, plan: Plan, device, ok: dict, timer: Timer, record, preds, card) -> None:
    """``forward``/``forward_t``/``backward`` at one ``d``: clone, then both variants, twice."""
    dtype = str(plan.dtype).removeprefix("torch.")
    x = torch.randn(plan.rows, d, device=device, dtype=plan.dtype)
    dy = torch.randn_like(x) if kind == "backward" else None
    nbytes = x.numel() * x.element_size()
    touches = 3 if kind == "backward" else 2  # backward reads x and dy, writes dx
    fns = {}
    for block, scale in VARIANTS:
        unit = Unit(kind, d, block, scale, plan.rows)
        _, (_, params, s, _) = unit_inputs(unit, 1, device, plan.dtype)
        fns[unit] = (lambda u=unit, p=params, s=s: launch_unit(u, x, p, s, dy))
    config = launcher_config(kind, d, plan.rows, device)
    for repeat in range(REPEATS):
        clone = throughput(timer(lambda: torch.clone(x)), 2 * nbytes)
        record(kind="clone", method="torch.clone", d=d, rows=plan.rows, dtype=dtype, repeat=repeat, ok=True,
               ratio=1.0, ratio_to="torch.clone", note=f"next to {kind}", **clone)
        for unit, fn in fns.items():
            common = dict(kind=kind, method=variant_name(unit.block, unit.scale), d=d, rows=plan.rows, dtype=dtype,
                          block=unit.block, scale=unit.scale, repeat=repeat, ratio_to="torch.clone",
                          target=target(kind, d), **predicted(preds, kind, d, dtype, unit.block, unit.scale, card))
            if not ok.get(unit):
                record(**common, ok=False, note="failed or missing check: no timing")
                continue
            t = throughput(timer(fn), touches * nbytes)
            record(**common, ok=True, ratio=t["median_ms"] / clone["median_ms"], config=config, **t)


def time_mixed(d: int, plan: Plan, device, ok: dict, timer: Timer, record, preds, card) -> None:
    """A mixed batch of ``plan.mixed_adapters`` adapters, for each run length of ``plan.mixed_runs``:
    clone, then both variants, twice; the ratio to ``torch.clone`` of the same rows."""
    dtype = str(plan.dtype).removeprefix("torch.")
    gen = torch.Generator().manual_seed(0)
    for run in plan.mixed_runs:
        fns, x = {}, None
        for block, scale in VARIANTS:
            unit = Unit("mixed", d, block, scale, plan.rows, adapters=plan.mixed_adapters)
            x, params, s, batch = mixed_inputs(unit, plan.rows, plan.mixed_adapters, run, device, plan.dtype, gen)
            fns[unit] = (lambda u=unit, x=x, p=params, s=s, b=batch: launch_mixed(u, x, p, s, b))
        nbytes = x.numel() * x.element_size()
        # the model's batch like this one: adapters drawn at random for the runs
        same_run = [r for r in preds if r.get("kernel") != "mixed" or (r.get("run_rows") == run and
                                                                       r.get("adapters") == plan.mixed_adapters
                                                                       and r.get("assign", "random") == "random")]
        for repeat in range(REPEATS):
            clone = throughput(timer(lambda: torch.clone(x)), 2 * nbytes)
            record(kind="clone", method="torch.clone", d=d, rows=plan.rows, dtype=dtype, repeat=repeat, ok=True,
                   ratio=1.0, ratio_to="torch.clone", note="next to mixed", **clone)
            for unit, fn in fns.items():
                common = dict(kind="mixed", method=f"{variant_name(unit.block, unit.scale)}, {plan.mixed_adapters} "
                              f"adapters, runs of {run}", d=d, rows=plan.rows, dtype=dtype, block=unit.block,
                              scale=unit.scale, repeat=repeat, ratio_to="torch.clone", target=target("mixed", d),
                              **predicted(same_run, "mixed", d, dtype, unit.block, unit.scale, card))
                if not ok.get(unit):
                    record(**common, ok=False, note="failed or missing check: no timing")
                    continue
                t = throughput(timer(fn), 2 * nbytes)
                record(**common, ok=True, ratio=t["median_ms"] / clone["median_ms"], **t)


def time_merge(d: int, plan: Plan, device, ok: dict, timer: Timer, record, preds, card) -> None:
    """``merged_linear`` end to end and its kernel alone, against ``torch.clone`` of ``W``."""
    dtype = str(plan.dtype).removeprefix("torch.")
    base = make_linear(d, d, device, plan.dtype)
    w = base.weight
    nbytes = w.numel() * w.element_size()
    layers, good = {}, {}
    x = torch.randn(64, d, device=device, dtype=plan.dtype)
    for block, scale in VARIANTS:
        unit = Unit("forward_t", d, block, scale, d)
        layer = qk.GivensLinear.from_linear(base, block=block, scale=scale)
        perturb(layer)
        layers[unit] = layer
        if ok.get(unit):
            # the merged layer computes what the adapted one does (bf16 both ways)
            with torch.no_grad():
                good[unit] = rel_error(layer.merged_linear()(x), layer(x)) < 2e-2
    config = launcher_config("forward_t", d, d, device)
    for repeat in range(REPEATS):
        clone = throughput(timer(lambda: torch.clone(w)), 2 * nbytes)
        record(kind="clone", method="torch.clone(W)", d=d, rows=d, dtype=dtype, repeat=repeat, ok=True, ratio=1.0,
               ratio_to="torch.clone(W)", note="next to merge", **clone)
        for unit, layer in layers.items():
            def kernel(layer=layer):
                scale = None if layer.scale is None else layer.scale.detach()
                return launch_forward(x=w, params=layer.rotation.detach(), scale=scale, block=layer.block,
                                      structure="tree", transpose=True)

            # the static model's "merge" rows are merged_linear() end to end; the kernel alone
            # has no row of its own (its "forward_t" rows are at 16384 rows)
            predictions = {"merge": predicted(preds, "merge", d, dtype, unit.block, unit.scale, card),
                           "merge_kernel": predicted([], "merge", d, dtype, unit.block, unit.scale)}
            for kind, fn in (("merge", layer.merged_linear), ("merge_kernel", kernel)):
                common = dict(kind=kind, method=variant_name(unit.block, unit.scale), d=d, rows=d, dtype=dtype,
                              block=unit.block, scale=unit.scale, repeat=repeat, ratio_to="torch.clone(W)",
                              target=target(kind, d), **predictions[kind])
                if not (ok.get(unit) and good.get(unit)):
                    record(**common, ok=False, note="failed check (kernel or merged layer): no timing")
                    continue
                t = throughput(timer(fn), 2 * nbytes)
                record(**common, ok=True, ratio=t["median_ms"] / clone["median_ms"],
                       config=config if kind == "merge_kernel" else None, **t)


def time_layer(d: int, plan: Plan, device, ok: dict, timer: Timer, record) -> None:
    """One training step (forward + backward, ``dx`` included) of a ``d -> d`` layer, per method."""
    dtype = str(plan.dtype).removeprefix("torch.")
    base = make_linear(d, d, device, plan.dtype)
    x = torch.randn(plan.tokens, d, device=device, dtype=plan.dtype)
    dy = torch.randn(plan.tokens, d, device=device, dtype=plan.dtype)
    found = {m.name: m for m in methods(d, d, peft_version() is not None)}
    steps, frozen = {}, {}
    for name in LAYER_METHODS:
        ours = name.startswith(("qGOFT", "GOFT"))
        block = ("quasi" if name.startswith("qGOFT") else "givens") if ours else None
        scale = name.endswith("+scale") if ours else None
        common = dict(kind="layer_step", method=name, d=d, rows=plan.tokens, dtype=dtype, block=block, scale=scale,
                      ratio_to="frozen nn.Linear", target=target("layer_step", d))
        if name not in found:
            record(**common, ok=False, note="not available (PEFT not installed)")
            continue
        if ours and not all(ok.get(Unit(p, d, block, scale, plan.tokens)) for p in ("forward", "backward")):
            record(**common, ok=False, note="kernel check failed: no timing")
            continue
        try:
            module, note = found[name].build(base)
            perturb(module)
            if not check_layer(module, base, x[:64]):
                record(**common, ok=False, note="layer check against float64 failed: no timing")
                continue
            xg = x.detach().clone().requires_grad_()
            leaves = [xg] + [p for p in module.parameters() if p.requires_grad]

            def step(module=module, xg=xg):
                torch.autograd.backward(module(xg), dy)

            for t in leaves:
                t.grad = None
            mem = {"saved": saved_bytes(lambda module=module, xg=xg: module(xg)), "peak": peak_bytes(step, device)}
            for t in leaves:
                t.grad = None
        except Exception as exc:  # a peer this PEFT version cannot build or run: the others go on
            record(**common, ok=False, note=f"raised: {type(exc).__name__}: {exc}"[:300])
            continue
        steps[name] = (step, leaves, mem, common, note, trainable_parameters(module))
    for repeat in range(REPEATS):
        for name, (step, leaves, mem, common, note, trainable) in steps.items():
            t = timer(step, grad_to_none=leaves)
            if name == LAYER_METHODS[0]:
                frozen[repeat] = (t["median_ms"], mem)
            base_ms, base_mem = frozen.get(repeat, (None, None))

            def above(key, mem=mem, base_mem=base_mem):
                if base_mem is None or mem[key] is None or base_mem[key] is None:
                    return None
                return mem[key] - base_mem[key]

            record(**common, repeat=repeat, ok=True, trainable=trainable, note=note or None,
                   ratio=None if base_ms is None else t["median_ms"] / base_ms,
                   saved_bytes_above=above("saved"), peak_bytes_above=above("peak"), **throughput(t, None))


# --- output -------------------------------------------------------------------------------------

class Recorder:
    """Appends one JSON line per result to ``path`` and flushes it at once; keeps the rows.

    Every line has exactly the keys ``fields``, in that order (``None`` where not given).
    """

    def __init__(self, path: str, meta: dict, fields: tuple[str, ...] = FIELDS):
        self.path, self.meta, self.rows, self.fields = path, meta, [], fields

    def __call__(self, **fields) -> dict:
        unknown = set(fields) - set(self.fields)
        if unknown:
            raise KeyError(f"unknown fields {sorted(unknown)}")
        row = {key: None for key in self.fields}
        row.update(self.meta)
        row.update(fields)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()
        self.rows.append(row)
        return row


def _ms(row) -> str:
    return "-" if row.get("median_ms") is None else f"{row['median_ms']:.4f}"


def _ratio(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def _predicted(row) -> str:
    """The model's optimistic and pessimistic figures (its card named in the header)."""
    if row.get("predicted_ratio") is None:
        return "-"
    if row.get("predicted_opt") is None:
        return _ratio(row["predicted_ratio"])
    return f"{row['predicted_opt']:.2f}-{row['predicted_ratio']:.2f}"


def _spread(row) -> str:
    return f"{row['q20_ms']:.4f}-{row['q80_ms']:.4f}"


def _gbps(value) -> str:
    return "-" if value is None else f"{value:.0f}" if value >= 10 else f"{value:.2f}"


def table(rows: list[dict]) -> str:
    """The summary of one run: kernels, layer, merge; each measurement's two repeats side by side."""
    if not rows:
        return "no results"
    meta = rows[0]
    dry = meta["dry_run"]
    head = ("CPU DRY RUN (Triton interpreter, wall clock): a rehearsal of the pipeline, NOT GPU DATA" if dry
            else f"GPU QUICK RUN on {meta['device']}")
    lines = [head, f"torch {meta['torch']}, triton {meta['triton']}, python {meta['python']}, numpy {meta['numpy']}, "
                   f"driver {meta['driver']}, CUDA {meta['cuda']}, peft {meta['peft']}; commit {meta['commit']} "
                   f"({meta['commit_source']}); pins {meta['env_pins'] or 'none'}", f"timer: {meta['timer']}", ""]
    compiled = [r for r in rows if r["kind"] == "compile"]
    failed = [r for r in compiled if not r["ok"]]
    lines.append(f"Compile and check against float64: {len(compiled) - len(failed)}/{len(compiled)} units pass"
                 + "".join(f"\n  FAILED {r['method']} d={r['d']} rows={r['rows']} {r['block']} scale={r['scale']}: "
                           f"{r['note']}" for r in failed))
    # measurements by (kind, method, d) in the order taken; clones by the group they stand next to
    by, clones = {}, {}
    for r in rows:
        if r["kind"] == "clone":
            clones.setdefault((r["note"].removeprefix("next to "), r["d"]), []).append(r)
        elif r["kind"] not in ("compile", "summary"):
            by.setdefault((r["kind"], r["method"], r["d"]), []).append(r)

    def verdict(reps):
        if dry or reps[0]["target"] is None:
            return "-"
        return f"<= {reps[0]['target']} " + ("ok" if max(r["ratio"] for r in reps) <= reps[0]["target"] else "OVER")

    def timed(reps):
        return [r for r in reps if r["ok"] and r["median_ms"] is not None]

    cards = sorted({r["predicted_card"] for r in rows if r.get("predicted_card")})
    model = (f"predicted: the static model's optimistic-pessimistic ratio for {', '.join(cards)} "
             f"(benchmarks/sass.py)" if cards else "predicted: the static model's ratio, where it has a row")
    lines += ["", "Kernels: median ms of each repeat, ratio to torch.clone of the same tensor timed next to it; "
              + model + ":", "",
              "| kind | d | rows | variant | median ms | q20-q80 ms | GB/s | ratio | predicted | target |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for (kind, d), reps in clones.items():
        if kind not in ("forward", "forward_t", "backward", "mixed"):
            continue
        lines.append(f"| {kind} | {d} | {reps[0]['rows']} | torch.clone | {' / '.join(_ms(r) for r in reps)} | "
                     f"| {_gbps(reps[0]['gbps'])} | 1.00 | | |")
        for (k, method, dd), mreps in by.items():
            if (k, dd) != (kind, d):
                continue
            ok = timed(mreps)
            if not ok:
                lines.append(f"| {kind} | {d} | {mreps[0]['rows']} | {method} | NO TIMING: {mreps[0]['note']} "
                             "| | | | | |")
                continue
            lines.append(f"| {kind} | {d} | {ok[0]['rows']} | {method} | {' / '.join(_ms(r) for r in ok)} "
                         f"| {' / '.join(_spread(r) for r in ok)} "
                         f"| {_gbps(ok[0]['gbps'])} | {' / '.join(_ratio(r['ratio']) for r in ok)} "
                         f"| {_predicted(ok[0])} | {verdict(ok)} |")
    layer = {k: v for k, v in by.items() if k[0] == "layer_step"}
    if layer:
        lines += ["", "Layer training step (forward + backward incl. dx), ratio to the frozen nn.Linear "
                  "(target <= 1.20 and below PEFT LoRA r=16):", "",
                  "| method | d -> k | tokens | step ms | ratio | saved above frozen MB | peak above frozen MB "
                  "| trainable |", "|---|---|---|---|---|---|---|---|"]
        for (_, method, d), reps in layer.items():
            ok = timed(reps)
            if not ok:
                lines.append(f"| {method} | {d} -> {d} | {reps[0]['rows']} | NO TIMING: {reps[0]['note']} | | | | |")
                continue
            mb = (lambda v: "-" if v is None else f"{v / 2**20:.1f}")  # noqa: E731
            lines.append(f"| {method} | {d} -> {d} | {ok[0]['rows']} | {' / '.join(_ms(r) for r in ok)} "
                         f"| {' / '.join(_ratio(r['ratio']) for r in ok)} | {mb(ok[0]['saved_bytes_above'])} "
                         f"| {mb(ok[0]['peak_bytes_above'])} | {ok[0]['trainable']:,} |")
    merge = {k: v for k, v in by.items() if k[0] in ("merge", "merge_kernel")}
    if merge:
        lines += ["", "Merge W R^T of a d x d weight, ratio to torch.clone(W) timed next to it:", "",
                  "| what | variant | d | median ms | ratio | predicted | target |", "|---|---|---|---|---|---|---|"]
        for (kind, d), reps in clones.items():
            if kind == "merge":
                lines.append(f"| torch.clone(W) | | {d} | {' / '.join(_ms(r) for r in reps)} | 1.00 | | |")
        for (kind, method, d), reps in merge.items():
            what = "merged_linear()" if kind == "merge" else "kernel alone"
            ok = timed(reps)
            if not ok:
                lines.append(f"| {what} | {method} | {d} | NO TIMING: {reps[0]['note']} | | | |")
                continue
            lines.append(f"| {what} | {method} | {d} | {' / '.join(_ms(r) for r in ok)} "
                         f"| {' / '.join(_ratio(r['ratio']) for r in ok)} | {_predicted(ok[0])} "
                         f"| {verdict(ok)} |")
    untimed = [r for r in rows if r["kind"] not in ("compile", "summary") and not r["ok"]]
    if untimed:
        lines += ["", "Not timed:"] + [f"  {r['kind']} d={r['d']} {r['method'] or ''}: {r['note']}" for r in untimed]
    summary = [r for r in rows if r["kind"] == "summary"]
    if summary:
        lines += ["", f"{summary[-1]['note']}; {summary[-1]['seconds']:.0f} s in all."]
    return "\n".join(lines)


def read_last_run(path: str) -> list[dict]:
    """The rows of the last run recorded in a ``gpu-quick.jsonl``."""
    with open(path) as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    last = rows[-1]["run_id"] if rows else None
    return [r for r in rows if r["run_id"] == last]


def among_results(path: str) -> bool:
    """Whether ``path`` lies among the committed results (``benchmarks/results/``, not its ignored ``latest/``)."""
    out, results = os.path.realpath(path), os.path.realpath(RESULTS)
    latest = os.path.join(results, "latest")
    return out.startswith(results + os.sep) and not (out == latest or out.startswith(latest + os.sep))


def run_metadata(device: torch.device, dry_run: bool, timer_label: str) -> dict:
    import numpy
    import triton

    commit, source = commit_id()
    return {
        "schema": SCHEMA, "run_id": time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"-{os.getpid()}",
        "dry_run": dry_run, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "device_type": device.type, "driver": driver_version() if device.type == "cuda" else None,
        "cuda": torch.version.cuda, "torch": torch.__version__, "triton": triton.__version__,
        "python": platform.python_version(), "numpy": numpy.__version__, "peft": peft_version(),
        "commit": commit, "commit_source": source, "timer": timer_label,
        "env_pins": {k: v for k, v in sorted(os.environ.items()) if k.startswith("QGOFT_") and k != "QGOFT_COMMIT"},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_quick", description=__doc__.splitlines()[0])
    parser.add_argument("--out", help=f"folder for {OUT_NAME} (appended to)")
    parser.add_argument("--dry-run", action="store_true",
                        help="rehearse on the CPU: Triton interpreter, tiny shapes, wall clock (not GPU data)")
    parser.add_argument("--only", default=",".join(KINDS),
                        help=f"comma-separated kinds to run, from {','.join(KINDS)} (default: all)")
    parser.add_argument("--dims", default=None, help="comma-separated kernel widths d, a subset of the plan's")
    parser.add_argument("--deadline", type=float, default=400.0,
                        help="seconds from the start after which timing stops and the table is printed; "
                             "the compile phase gets 60%% of it (default 400)")
    parser.add_argument("--workers", type=int, default=None, help="compile processes (default: CPU count, at most 16)")
    parser.add_argument("--predictions", default=None,
                        help="the static model's rows (default: benchmarks/results/sass-sm90-triton3.6.json with "
                             "triton 3.6, else sass-sm90.json); its mixed-batch rows from the file beside it whose "
                             "name has sass-sm90-mixed for sass-sm90")
    parser.add_argument("--table", metavar="JSONL", help="print the table of the last run in this file and exit")
    args = parser.parse_args(argv)
    start = time.monotonic()
    os.environ.setdefault("TRITON_CACHE_DIR", TRITON_CACHE)
    if args.table:
        print(table(read_last_run(args.table)))
        return 0
    if not args.out:
        parser.error("--out is required")
    only = tuple(k.strip() for k in args.only.split(",") if k.strip())
    if set(only) - set(KINDS):
        parser.error(f"--only takes kinds from {','.join(KINDS)}, got {args.only!r}")
    if args.dry_run:
        if among_results(args.out):
            parser.error("a dry run is not GPU data: write it outside benchmarks/results/ (or to its ignored latest/)")
        # the interpreter runs the kernels on the CPU; it must be set before they are defined
        os.environ["TRITON_INTERPRET"] = "1"
        problem = interpreter_problem()
        if problem:
            print(f"gpu-quick --dry-run: {problem}", file=sys.stderr)
            return 2
        device, plan = torch.device("cpu"), DRY_PLAN
    else:
        if not require_cuda("make gpu-quick"):
            return 2
        device, plan = torch.device("cuda"), GPU_PLAN
    # poisoned outputs add a fill to every launch: the workers' checks use them, the timings must not
    os.environ.pop("QGOFT_POISON", None)
    dims = None if args.dims is None else tuple(int(d) for d in args.dims.split(","))
    plan_groups = groups(plan, only, dims)
    units = sorted({u for g in plan_groups for u in units_for(g, plan)}, key=unit_cost)
    workers = args.workers or min(16, os.cpu_count() or 1, max(1, len(units)))
    deadline = start + args.deadline
    timer = Timer(device, deadline)
    os.makedirs(args.out, exist_ok=True)
    record = Recorder(os.path.join(args.out, OUT_NAME), run_metadata(device, args.dry_run, timer.label))
    predictions = args.predictions or default_predictions()
    preds = load_predictions(predictions) + load_predictions(mixed_predictions(predictions))
    card = card_of(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    print(f"{'CPU dry run' if args.dry_run else 'GPU run'}: {len(units)} kernel specialisations to compile and "
          f"check in {workers} processes, then {len(plan_groups)} timing groups; deadline {args.deadline:.0f} s; "
          f"writing {record.path}", flush=True)
    ok = compile_all(units, plan.dtype, plan.check_rows, device, workers, start + 0.6 * args.deadline, record)
    print(f"compile phase: {sum(ok.values())}/{len(units)} pass, {time.monotonic() - start:.0f} s", flush=True)
    stopped = None
    for kind, d in plan_groups:
        print(f"timing {kind} d={d}", flush=True)
        try:
            if kind == "merge":
                time_merge(d, plan, device, ok, timer, record, preds, card)
            elif kind == "layer":
                time_layer(d, plan, device, ok, timer, record)
            elif kind == "mixed":
                time_mixed(d, plan, device, ok, timer, record, preds, card)
            else:
                time_kernel(kind, d, plan, device, ok, timer, record, preds, card)
        except OutOfTime:
            stopped = f"stopped at the deadline ({args.deadline:.0f} s) during {kind} d={d}"
            break
        except Exception as exc:  # out of memory, say: the group's line says so, the next group runs
            record(kind={"layer": "layer_step"}.get(kind, kind), d=d, ok=False,
                   note=f"group raised: {type(exc).__name__}: {exc}"[:300])
            if device.type == "cuda":
                torch.cuda.empty_cache()
    all_ok = all(ok.values()) and all(r["ok"] for r in record.rows if r["kind"] != "summary")
    record(kind="summary", ok=all_ok, seconds=round(time.monotonic() - start, 1),
           note=stopped or ("finished" + ("" if all_ok else " with failures")),
           errors={"failed_units": [u.name for u, good in ok.items() if not good]})
    print(table(record.rows))
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
