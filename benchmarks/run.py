"""The benchmark run: ``python -m benchmarks.run`` (``make bench-full`` calls it after ``verify``;
``make bench`` calls ``--plan first``, the peers table alone at four widths, with fewer rounds).

Four tables, measured on whatever device is present:

1. kernel: ``givens_rotate`` forward, backward and both, against ``torch.clone`` of the same
   tensor (the floor);
2. layer: one training step (forward + backward, no optimizer) and one inference forward of
   a single adapted layer, against the frozen ``nn.Linear``, with the peers (PEFT LoRA,
   OFT, BOFT) and the paper's dense method;
3. merge: producing the merged weight, ours against building the dense ``R``;
4. peers (CPU): the training step and the unmerged inference forward of every GOFT/qGOFT
   variant against PEFT's OFT (block 32) and LoRA (r = 8) on the same layer, at the widths of
   small models, all timed in the same interleaved rounds, so the ratios hold under a
   changing load.

Every configuration of ours is first checked against the float64 oracle; one that fails
gets no timing. Results go to ``benchmarks/results/latest/<device>.json`` (``latest/first/``
for ``--plan first``; ignored by git) and
CSV files beside it, with the device, versions, commit, shapes, dtype and raw timings;
``make bench-publish`` copies them over the committed ones in ``benchmarks/results/``.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import re
import sys
import time
from dataclasses import dataclass

import torch

import qgoft_kernels as qk
from qgoft_kernels import native
from qgoft_kernels.dense import rotates_weight
from qgoft_kernels.torch_path import formulation
from qgoft_kernels.verify import Case, check_case, rel_error

from .methods import (
    PEER_METHODS,
    SWEEPS_METHODS,
    SweepsLinear,
    make_linear,
    methods,
    own_work,
    peft_version,
    trainable_parameters,
)
from .paper_dense import PaperDenseGivensLinear
from .provenance import commit_id
from .timing import (
    interleaved_ms,
    joined_rounds,
    paired_ratio,
    peak_bytes,
    saved_bytes,
    steady_allocator,
    time_ms,
    wait_for_quiet,
)

#: The committed results (what the docs show); only ``make bench-publish`` writes here.
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
#: Fresh results of this machine (ignored by git): where every run writes by default.
LATEST = os.path.join(RESULTS, "latest")


@dataclass(frozen=True)
class Plan:
    dtype: torch.dtype
    kernel_dims: tuple[int, ...]
    kernel_rows: tuple[int, ...]
    layer_shapes: tuple[tuple[int, int], ...]
    tokens: int
    merge_dims: tuple[int, ...]
    min_run_time: float = 0.2
    # the peers table: (d, k) shapes and tokens (empty: no such table)
    peer_shapes: tuple[tuple[int, int], ...] = ()
    peer_tokens: int = 1280
    # rounds per shape: up to peer_rounds while within peer_budget_s, and at least peer_min_rounds
    peer_rounds: int = 30
    peer_min_rounds: int = 8
    peer_budget_s: float = 60.0


GPU_PLAN = Plan(torch.bfloat16, (768, 1024, 2048, 3072, 4096, 8192, 11008, 16384), (4096, 16384, 65536),
                ((1024, 1024), (1024, 4096), (4096, 4096), (4096, 16384)), 16384, (1024, 4096))
#: The widths of small models, d -> d and d -> 4d, and a down-projection (issue 14's shapes).
PEER_SHAPES = tuple((d, k) for d in (256, 384, 768, 1024, 1536, 4096) for k in (d, 4 * d)) + ((1536, 384),)
CPU_PLAN = Plan(torch.float32, (256, 1024), (1024, 4096), ((256, 256), (256, 1024), (1024, 1024), (1024, 4096)),
                1024, (256, 1024), min_run_time=0.5, peer_shapes=PEER_SHAPES)
QUICK_PLAN = Plan(torch.float32, (64,), (256,), ((64, 64),), 128, (64,), min_run_time=0.02,
                  peer_shapes=((64, 64), (64, 256)), peer_tokens=128, peer_rounds=15, peer_min_rounds=6,
                  peer_budget_s=1.0)

#: ``make bench``'s first look (at most a few minutes on 2 cores): the peers table alone, at a
#: small, a BERT-base, a down-projection and a LLaMA width, with fewer rounds per shape.
FIRST_PLAN = Plan(torch.float32, (), (), (), 1024, (), min_run_time=0.5,
                  peer_shapes=((256, 1024), (768, 3072), (1536, 384), (4096, 4096)),
                  peer_rounds=10, peer_min_rounds=6, peer_budget_s=10.0)
#: ``--plan``: ``full`` is GPU_PLAN on a GPU and CPU_PLAN on a CPU.
PLANS = ("first", "full", "smoke")

KERNEL_VARIANTS = (("quasi", True), ("givens", False))


def cpu_model() -> str | None:
    """The CPU's model name from ``/proc/cpuinfo`` (``None`` where there is none): timings of the
    CPU path differ between CPU families (docs/math.md §5)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return " ".join(value.split())
    except OSError:
        pass
    return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = cpu_model()
    arch = platform.processor() or platform.machine()
    return f"{arch} CPU{f' ({model})' if model else ''}, {torch.get_num_threads()} threads"


def slug(device: torch.device) -> str:
    if device.type == "cuda":
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
    return f"cpu-{platform.machine()}-{torch.get_num_threads()}t"


def metadata(device: torch.device, plan: Plan) -> dict:
    import triton

    return {
        "device": device_name(device), "device_type": device.type, "torch": torch.__version__,
        "triton": triton.__version__, "peft": peft_version(), "python": platform.python_version(),
        "qgoft_kernels": qk.__version__, "commit": commit_id()[0],
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "dtype": str(plan.dtype).removeprefix("torch."), "adapter_params": "float32",
        "timer": "triton.testing.do_bench (CUDA events)" if device.type == "cuda"
        else "torch.utils.benchmark.Timer.blocked_autorange",
        "qgoft_path": _qgoft_path(device),
    }


def _qgoft_path(device: torch.device) -> str:
    if device.type == "cuda":
        return "Triton kernels"
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return "Triton interpreter (timings meaningless)"
    return f"PyTorch path, {formulation()} formulation (CPU)"


# --- 1. kernel level --------------------------------------------------------------------------

def kernel_rows(device: torch.device, plan: Plan) -> list[dict]:
    rows = []
    checked = {}
    for d in plan.kernel_dims:
        for block, scale in KERNEL_VARIANTS:
            case = Case(d, 257, block, scale, False, plan.dtype)
            res = check_case(case, device, backend="auto")
            checked[(d, block)] = all(r[2] for r in res.values())
        for n in plan.kernel_rows:
            x = torch.randn(n, d, device=device, dtype=plan.dtype)
            nbytes = x.numel() * x.element_size()
            clone = time_ms(lambda: torch.clone(x), device, plan.min_run_time)
            rows.append({"d": d, "rows": n, "variant": "torch.clone", "pass": "copy", "ms": clone,
                         "bytes": 2 * nbytes, "vs_clone": 1.0, "correct": True})
            for block, scale in KERNEL_VARIANTS:
                name = f"{block}{'+scale' if scale else ''}"
                if not checked[(d, block)]:
                    rows.append({"d": d, "rows": n, "variant": name, "pass": "all", "ms": None, "correct": False})
                    continue
                p = _random_params(d, block, device)
                s = (1 + 0.1 * torch.randn(d, device=device)) if scale else None
                leaves = [t.requires_grad_() for t in (p, s) if t is not None]
                xg = x.detach().clone().requires_grad_()
                y = qk.givens_rotate(xg, p, block=block, scale=s)
                dy = torch.randn_like(y)
                passes = {
                    "fwd": (lambda: qk.givens_rotate(x, p.detach(), block=block,
                                                     scale=None if s is None else s.detach()), 2),
                    "bwd": (lambda: torch.autograd.grad(y, [xg, *leaves], dy, retain_graph=True), 3),
                    "fwd+bwd": (lambda: torch.autograd.grad(qk.givens_rotate(xg, p, block=block, scale=s),
                                                            [xg, *leaves], dy), 5),
                }
                for pass_name, (fn, touches) in passes.items():
                    t = time_ms(fn, device, plan.min_run_time)
                    rows.append({"d": d, "rows": n, "variant": name, "pass": pass_name, "ms": t,
                                 "bytes": touches * nbytes, "vs_clone": t["median"] / clone["median"], "correct": True})
    return rows


def _random_params(d, block, device):
    n = qk.num_pairs(d)
    if block == "givens":
        return 0.3 * torch.randn(n, device=device)
    return torch.eye(2, device=device).expand(n, 2, 2) + 0.1 * torch.randn(n, 2, 2, device=device)


# --- 2. layer level ---------------------------------------------------------------------------

def check_layer(module, base, x) -> bool:
    """Our layers and the paper's: the output equals the frozen layer on ``x @ R`` (float64)."""
    if isinstance(module, SweepsLinear):
        module, layer = module.layer, module
    else:
        layer = module
    if not isinstance(module, qk.GivensLinear):
        return True
    with torch.no_grad():
        R = qk.givens_matrix(module.in_features, module.rotation.double(), block=module.block,
                             scale=None if module.scale is None else module.scale.double())
        ref = (x.double() @ R) @ base.weight.double().T + base.bias.double()
        got = layer(x)
    bound = 1e-5 if x.dtype == torch.float32 else 2e-2
    return rel_error(got, ref) <= bound


def perturb(module):
    """Move an adapter off its identity init, so that checks and timings see real values."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen).to(p.device, p.dtype))


def step_and_infer(forward, module, x: torch.Tensor, grads: tuple[torch.Tensor, ...]):
    """The two timed functions of ``forward`` (a layer, or an adapter's own work): a training
    step (forward on a copy of ``x`` requiring grad, backward with the one of ``grads`` of
    its output's shape, then ``module``'s gradients and the input's dropped, so that every
    step starts alike) and an inference forward of ``x``."""
    xg = x.detach().clone().requires_grad_()

    def step():
        out = forward(xg)
        torch.autograd.backward(out, next(g for g in grads if g.shape == out.shape))
        xg.grad = None
        for p in module.parameters():
            p.grad = None

    def infer():
        with torch.no_grad():
            forward(x)

    return step, infer


def layer_rows(device: torch.device, plan: Plan) -> list[dict]:
    """One training step and one inference forward of every method, against the frozen layer.

    On a GPU each method is timed on its own (CUDA events). On a CPU all methods of a shape
    run in the same interleaved rounds (:func:`benchmarks.timing.interleaved_ms`), as in the
    peers table: timed one after another, a change of load between two methods would show
    as a difference between them (a step of ours measured below the frozen layer's alone).
    """
    rows = []
    has_peft = peft_version() is not None
    for d, k in plan.layer_shapes:
        base = make_linear(d, k, device, plan.dtype)
        x = torch.randn(plan.tokens, d, device=device, dtype=plan.dtype)
        dy = torch.randn(plan.tokens, k, device=device, dtype=plan.dtype)
        shape_rows, fns = [], {}
        for method in methods(d, k, has_peft):
            module, note = method.build(base)
            perturb(module)
            correct = check_layer(module, base, x[:64])
            row = {"d": d, "k": k, "tokens": plan.tokens, "method": method.name, "family": method.family,
                   "trainable": trainable_parameters(module), "note": note, "correct": correct}
            if correct:
                step, infer = step_and_infer(module, module, x, (dy,))
                xg = x.detach().clone().requires_grad_()
                row["saved_bytes"] = saved_bytes(lambda: module(xg))
                row["peak_bytes"] = peak_bytes(step, device)
                if device.type == "cpu":
                    fns[f"{method.name}|train"], fns[f"{method.name}|infer"] = step, infer
                else:
                    row["train_ms"] = time_ms(step, device, plan.min_run_time)
                    row["infer_ms"] = time_ms(infer, device, plan.min_run_time)
                    # drop the layer before building the next (the closures hold the module)
                    step = infer = module = None
            shape_rows.append(row)
        if fns:
            times = interleaved_ms(fns, rounds=plan.peer_rounds, budget_s=plan.peer_budget_s / 3,
                                   min_rounds=plan.peer_min_rounds)["times"]
            for row in shape_rows:
                for kind in ("train", "infer"):
                    t = times.get(f"{row['method']}|{kind}")
                    if t is not None:
                        row[f"{kind}_ms"] = {key: v for key, v in t.items() if key != "samples"}
        fns = None
        frozen = next((r for r in shape_rows if r["family"] == "floor" and r["correct"]), None)
        for row in shape_rows:
            if frozen is not None and row["correct"]:
                row["train_vs_frozen"] = row["train_ms"]["median"] / frozen["train_ms"]["median"]
                row["infer_vs_frozen"] = row["infer_ms"]["median"] / frozen["infer_ms"]["median"]
                row["saved_above_frozen"] = row["saved_bytes"] - frozen["saved_bytes"]
                if row["peak_bytes"] is not None:
                    row["peak_above_frozen"] = row["peak_bytes"] - frozen["peak_bytes"]
            rows.append(row)
    return rows


# --- 4. peers (CPU) ----------------------------------------------------------------------------

#: The goal on a CPU (issue 14): a step no slower than OFT's, within this factor of LoRA's.
LORA_FACTOR = 1.2
#: Each peer of the goal: the key of its ratios in a row, its method, and the bound on the ratio.
GOAL = {"oft": ("PEFT OFT b=32", 1.0), "lora": ("PEFT LoRA r=8", LORA_FACTOR)}


def _fill_peer_rows(rows: list[dict], timed: dict, passes: int) -> None:
    """Each row's medians and ratios (plain and round by round) from ``timed``
    (:func:`benchmarks.timing.interleaved_ms`), with the passes they came from."""
    times = timed["times"]
    for row in rows:
        for kind in ("train", "infer", "own-train", "own-infer"):
            t = times.get(f"{row['method']}|{kind}")
            if t is None and kind.startswith("own"):
                continue
            field = kind.replace("-", "_")
            row[f"{field}_ms"] = None if t is None else {key: v for key, v in t.items() if key != "samples"}
            for key, (peer, _) in GOAL.items():
                other = times.get(f"{peer}|{kind}")
                if t is not None and other is not None:
                    row[f"{field}_vs_{key}"] = t["median"] / other["median"]
                    row[f"{field}_vs_{key}_paired"] = paired_ratio(t["samples"], other["samples"])
        row["load"] = timed["load"]
        row["others_busy"] = timed["others_busy"]
        row["passes"] = passes


def peer_rows(device: torch.device, plan: Plan, quiet: float | None = None) -> list[dict]:
    """Training step and inference forward of our variants beside PEFT OFT b=32 and LoRA r=8.

    For each shape every method is built around the same frozen layer and checked (ours,
    against the float64 ``x @ R``); then all of them, training and inference, run in the
    same interleaved rounds (:func:`benchmarks.timing.interleaved_ms`), and each ratio is a
    ratio of medians from those rounds; ``*_paired`` is the same comparison round by round,
    with its 95% confidence interval (:func:`benchmarks.timing.paired_ratio`).
    """
    rows = []
    if peft_version() is None:
        return rows
    bar = _progress(plan)
    for i, (d, k) in enumerate(plan.peer_shapes):
        bar.set_description(f"peers, shape {i + 1} of {len(plan.peer_shapes)} ({d} -> {k})", refresh=True)
        base = make_linear(d, k, device, plan.dtype)
        x = torch.randn(plan.peer_tokens, d, device=device, dtype=plan.dtype)
        dy = torch.randn(plan.peer_tokens, k, device=device, dtype=plan.dtype)
        fns, built = {}, []
        # where ours rotates x, its whole addition to the frozen layer is x @ R: then each
        # adapter's own work is timed too, in the same rounds (own_work)
        own = not rotates_weight(k, plan.peer_tokens, native.library() is not None)
        with torch.no_grad():
            frozen_out = base(x) if own else None
        # the gradient of an own-work output of x's shape (ours, OFT's); LoRA's has dy's
        grads = (dy, torch.randn_like(x)) if own else (dy,)
        for method in [m for m in [*methods(d, k, True), *SWEEPS_METHODS] if m.name in PEER_METHODS]:
            module, note = method.build(base)
            perturb(module)
            row = {"d": d, "k": k, "tokens": plan.peer_tokens, "method": method.name, "family": method.family,
                   "trainable": trainable_parameters(module), "note": note,
                   "correct": check_layer(module, base, x[:64])}
            built.append((row, module))
            if row["correct"]:
                fns[(method.name, "train")], fns[(method.name, "infer")] = step_and_infer(module, module, x, grads)
                work = own_work(module, frozen_out) if own else None
                if work is not None:
                    fns[(method.name, "own-train")], fns[(method.name, "own-infer")] = step_and_infer(
                        work, module, x, grads)
        # at least 6 rounds give a 95% interval of the per-round ratios (paired_ratio); at the
        # largest shapes, where the adapters' costs are a percent or two of the frozen matmuls'
        # on either side, more rounds narrow it
        named = {f"{name}|{kind}": fn for (name, kind), fn in fns.items()}

        def timed_rounds(seed: int) -> dict:
            if quiet is not None:
                wait_for_quiet(quiet)
            return interleaved_ms(named, rounds=plan.peer_rounds, budget_s=plan.peer_budget_s,
                                  min_rounds=plan.peer_min_rounds, seed=seed)

        shape_rows = [row for row, _ in built]
        timed = timed_rounds(0)
        _fill_peer_rows(shape_rows, timed, passes=1)
        # a shape that its first pass leaves within the spread for a variant of ours gets one
        # more pass of the same size, and the verdicts are on both passes' rounds together
        if any(goal_verdict(row, kind) == "noise" for row in shape_rows if held_to_goal(row)
               for kind in ("train", "infer")):
            timed = joined_rounds(timed, timed_rounds(1))
            _fill_peer_rows(shape_rows, timed, passes=2)
        rows += shape_rows
        bar.write(f"peers {d} -> {k}: done (load {timed['load']}, other CPUs busy {timed['others_busy']})")
        bar.update(d * k)
        built = fns = None
    bar.close()
    return rows


def _progress(plan: Plan):
    """A progress bar over the peers shapes, weighted by their work (``d * k``: the time left it
    shows follows the shapes' cost, not their count)."""
    from tqdm import tqdm

    return tqdm(total=sum(d * k for d, k in plan.peer_shapes), file=sys.stderr, mininterval=1.0,
                bar_format="{desc} {percentage:3.0f}%|{bar:20}| {elapsed} elapsed, {remaining} left")


def meets_goal(row: dict, kind: str, peers: tuple[str, ...] = tuple(GOAL)) -> bool:
    """By the medians, no slower than OFT and within ``LORA_FACTOR`` of LoRA (for ``kind``
    "train" or "infer"); ``peers`` (keys of :data:`GOAL`) checks only those bounds."""
    return all(row.get(f"{kind}_vs_{key}", 2.0) <= GOAL[key][1] for key in peers)


def held_to_goal(row: dict) -> bool:
    """Whether a peers row is a variant of ours that the goal applies to (the sweeps rows are
    the "before", held to no goal)."""
    return row["correct"] and row["family"] == "qgoft"


#: The verdict where the layer's totals tie within the spread and the adapter's own work
#: decides (:func:`goal_verdict`).
BY_OWN_WORK = "yes (own work)"


def goal_verdict(row: dict, kind: str) -> str:
    """``"yes"`` (:func:`meets_goal`); :data:`BY_OWN_WORK` where the medians miss OFT's time
    only within the rounds' spread, LoRA's bound is met, and the adapter's own work (its whole
    addition to the frozen layer's calls, which are the same for OFT) is measurably cheaper
    than OFT's in the same rounds (the 95% interval of that paired ratio lies below 1);
    ``"noise"`` where it is missed only within the rounds' spread (the 95% interval of each
    paired ratio reaches its bound: not measurably slower than OFT, nor measurably past
    ``LORA_FACTOR`` x LoRA), ``"NO"`` where it is measurably missed, and ``"missed"`` where no
    round-by-round comparison was recorded (older results)."""
    if meets_goal(row, kind):
        return "yes"
    paired = [(row.get(f"{kind}_vs_{key}_paired"), bound) for key, (_, bound) in GOAL.items()]
    if not all(p and p["level"] for p, _ in paired):
        return "missed"
    if not all(p["lo"] <= bound for p, bound in paired):
        return "NO"
    own = row.get(f"own_{kind}_vs_oft_paired")
    if meets_goal(row, kind, ("lora",)) and own and own["level"] and own["hi"] < GOAL["oft"][1]:
        return BY_OWN_WORK
    return "noise"


def peers_summary(peers: list[dict]) -> list[str]:
    """The CPU peers table in short: training step of GOFT and qGOFT over PEFT OFT's and LoRA's."""
    if not peers:
        return []
    by = {(r["d"], r["k"], r["method"]): r for r in peers if r["correct"]}
    shapes = list(dict.fromkeys((r["d"], r["k"]) for r in peers))
    names = ("qGOFT quasi+scale", "GOFT givens", "qGOFT quasi+scale (sweeps)")
    lines = [f"Training step on the CPU at the widths of small models ({peers[0]['tokens']} tokens, fp32), over PEFT "
             f"OFT b=32's and LoRA r=8's from the same interleaved rounds; the last column is the PyTorch path "
             f"before its dense formulation (docs/benchmarks.md has every variant and the inference forward):", "",
             "| d -> k | qGOFT / OFT | qGOFT / LoRA | GOFT / OFT | GOFT / LoRA | qGOFT before / OFT |",
             "|---|---|---|---|---|---|"]
    for d, k in shapes:
        cells = []
        for name, key in ((names[0], "oft"), (names[0], "lora"), (names[1], "oft"), (names[1], "lora"),
                          (names[2], "oft")):
            r = by.get((d, k, name))
            cells.append(f"{r[f'train_vs_{key}']:.2f}" if r and f"train_vs_{key}" in r else "-")
        lines.append(f"| {d} -> {k} | " + " | ".join(cells) + " |")
    ours = [r for r in peers if held_to_goal(r)]
    for kind, what in (("train", "training step"), ("infer", "inference forward")):
        verdicts = [goal_verdict(r, kind) for r in ours]
        lines += ["", f"Goal for the {what} (at most OFT's time and {LORA_FACTOR}x LoRA's), over all {len(ours)} "
                      f"variants and shapes of ours: met in {verdicts.count('yes') + verdicts.count(BY_OWN_WORK)} "
                      f"({verdicts.count(BY_OWN_WORK)} of them by the adapter's own work, where the layer's totals "
                      f"tie within the rounds' spread); missed by the medians but within "
                      f"the rounds' spread (a round-by-round 95% interval that reaches the bound) in "
                      f"{verdicts.count('noise')}; measurably missed in {verdicts.count('NO')}"
                      + (f"; missed with no round-by-round comparison recorded in {verdicts.count('missed')}"
                         if "missed" in verdicts else "") + "."]
    return lines + [""]


# --- 3. merge ---------------------------------------------------------------------------------

def merge_rows(device: torch.device, plan: Plan) -> list[dict]:
    rows = []
    for d in plan.merge_dims:
        base = make_linear(d, d, device, plan.dtype)
        ours = qk.GivensLinear.from_linear(base, block="quasi", scale=True)
        perturb(ours)
        paper = PaperDenseGivensLinear.from_linear(base, block="quasi", scale=True)
        paper.load_state_dict(ours.state_dict())

        def dense_merge():
            with torch.no_grad():
                return (base.weight.float() @ paper.dense_rotation().T).to(base.weight.dtype)

        err = rel_error(ours.merged_linear().weight, dense_merge())
        ok = err <= (1e-5 if plan.dtype == torch.float32 else 2e-2)
        row = {"d": d, "dtype": str(plan.dtype).removeprefix("torch."), "rel_err_vs_dense": err, "correct": ok}
        if ok:
            w = base.weight
            row["clone_ms"] = time_ms(lambda: torch.clone(w), device, plan.min_run_time)
            row["ours_ms"] = time_ms(ours.merged_linear, device, plan.min_run_time)
            row["dense_ms"] = time_ms(dense_merge, device, plan.min_run_time)
        rows.append(row)
    return rows


# --- output -----------------------------------------------------------------------------------

def _fmt_ms(t):
    return "-" if t is None else f"{t['median']:.3f}"


def rounds_cell(row: dict) -> str:
    """The rounds a peers row's times come from, and the passes where there were two."""
    n = (row.get("train_vs_oft_paired") or {}).get("rounds")
    if n is None:
        return "-"
    return f"{n} (2 passes)" if row.get("passes", 1) > 1 else str(n)


def format_interval(p: dict | None) -> str:
    """A paired ratio as ``median (lo-hi)``; the range, marked, where too few rounds ran for 95%."""
    if not p:
        return "-"
    return f"{p['median']:.2f} ({p['lo']:.2f}-{p['hi']:.2f}{'' if p['level'] else ', range'})"


def tables(result: dict) -> str:
    meta = result["meta"]
    lines = [f"Device: {meta['device']}; torch {meta['torch']}, triton {meta['triton']}, peft {meta['peft']}; "
             f"commit {meta['commit']}; {meta['dtype']} activations, fp32 adapters; qGOFT path: {meta['qgoft_path']}"
             f"{'; freed memory kept in the process (glibc mallopt)' if meta.get('allocator') else ''}."]
    if result["kernel"]:
        lines += ["", "Kernel (givens_rotate), median ms and ratio to torch.clone of the same tensor:", "",
                  "| d | rows | variant | fwd ms | fwd / clone | bwd ms | bwd / clone | fwd+bwd ms | fwd+bwd / clone |",
                  "|---|---|---|---|---|---|---|---|---|"]
    by = {}
    for r in result["kernel"]:
        by.setdefault((r["d"], r["rows"], r["variant"]), {})[r["pass"]] = r
    for (d, n, variant), passes in by.items():
        if variant == "torch.clone":
            continue
        if not all(p["correct"] for p in passes.values()):
            lines.append(f"| {d} | {n} | {variant} | FAILED CHECK: no timing | | | | | |")
            continue
        cells = []
        for p in ("fwd", "bwd", "fwd+bwd"):
            cells += [_fmt_ms(passes[p]["ms"]), f"{passes[p]['vs_clone']:.2f}"]
        lines.append(f"| {d} | {n} | {variant} | " + " | ".join(cells) + " |")
    if result["layer"]:
        lines += ["", "Layer (d -> k, one training step = forward + backward incl. dx; inference = unmerged forward):",
                  "", "| d -> k | tokens | method | trainable | train ms | train / frozen | infer ms | infer / frozen "
                  "| saved for bwd above frozen (MB) | peak above frozen (MB) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["layer"]:
        if not r["correct"]:
            lines.append(f"| {r['d']} -> {r['k']} | {r['tokens']} | {r['method']} | {r['trainable']} "
                         f"| FAILED CHECK | | | | | |")
            continue
        ratio = lambda key: f"{r[key]:.2f}" if key in r else "1.00"  # noqa: E731
        mb = lambda key: f"{r[key] / 2**20:.1f}" if r.get(key) is not None else "-"  # noqa: E731
        note = f" ({r['note']})" if r["note"] else ""
        lines.append(f"| {r['d']} -> {r['k']} | {r['tokens']} | {r['method']}{note} "
                     f"| {r['trainable']:,} | {_fmt_ms(r['train_ms'])} | {ratio('train_vs_frozen')} "
                     f"| {_fmt_ms(r['infer_ms'])} | {ratio('infer_vs_frozen')} | {mb('saved_above_frozen')} "
                     f"| {mb('peak_above_frozen')} |")
    peers = result.get("peers", [])
    if peers:
        lines += ["", f"Peers on the CPU (d -> k on {peers[0]['tokens']} tokens, fp32; training step = forward + "
                  f"backward incl. dx; inference = unmerged forward; median ms of interleaved rounds; goal: at most "
                  f"OFT's time and {LORA_FACTOR}x LoRA's; \"noise\": missed by the medians, but the round-by-round "
                  f"ratio's 95% interval reaches the bound; \"{BY_OWN_WORK}\": missed by the medians within that "
                  f"spread, and the adapter's own work, measured in the same rounds (the table after this one), "
                  f"measurably below OFT's; a shape left within the spread by its first pass of rounds gets a second "
                  f"pass of the same size, and its ratios are on both):", "",
                  "| d -> k | method | train ms | train / OFT | train / OFT, by round (95%) | train / LoRA | infer ms "
                  "| infer / OFT | infer / LoRA | goal met (train, infer) | rounds | load before / after "
                  "| other CPUs busy |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in peers:
            if not r["correct"]:
                lines.append(f"| {r['d']} -> {r['k']} | {r['method']} | FAILED CHECK | | | | | | | | | | |")
                continue
            ratio = lambda key: f"{r[key]:.2f}" if key in r else "-"  # noqa: E731
            ours = held_to_goal(r)
            busy = "-" if r.get("others_busy") is None else f"{r['others_busy']:.2f}"
            goal = f"{goal_verdict(r, 'train')}, {goal_verdict(r, 'infer')}" if ours else ""
            lines.append(f"| {r['d']} -> {r['k']} | {r['method']} | {_fmt_ms(r['train_ms'])} | {ratio('train_vs_oft')} "
                         f"| {format_interval(r.get('train_vs_oft_paired'))} "
                         f"| {ratio('train_vs_lora')} | {_fmt_ms(r['infer_ms'])} | {ratio('infer_vs_oft')} "
                         f"| {ratio('infer_vs_lora')} | {goal} | {rounds_cell(r)} "
                         f"| {r['load'][0]:.1f} / {r['load'][1]:.1f} | {busy} |")
    own = [r for r in peers if r.get("own_train_ms")]
    if own:
        lines += ["", "The adapters' own work in the same rounds, at the shapes where ours rotates x (its whole "
                  "addition to the frozen layer is then x @ R): ours x @ R, OFT its rotation module, LoRA its two "
                  "products and the sum; training = forward + backward incl. dx; the frozen layer's matmuls, the "
                  "same calls for every method, left out:", "",
                  "| d -> k | method | train ms | train / OFT | train / OFT, by round (95%) | train / frozen step "
                  "| infer ms | infer / OFT | infer / OFT, by round (95%) | infer / frozen forward |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        frozen = {(r["d"], r["k"]): r for r in peers if r["family"] == "floor" and r["correct"]}
        for r in own:
            f = frozen.get((r["d"], r["k"]))
            share = lambda kind: (f"{r[f'own_{kind}_ms']['median'] / f[f'{kind}_ms']['median']:.3f}"  # noqa: E731
                                  if f and f.get(f"{kind}_ms") else "-")
            ratio = lambda key: f"{r[key]:.2f}" if key in r else "-"  # noqa: E731
            lines.append(f"| {r['d']} -> {r['k']} | {r['method']} | {_fmt_ms(r['own_train_ms'])} "
                         f"| {ratio('own_train_vs_oft')} | {format_interval(r.get('own_train_vs_oft_paired'))} "
                         f"| {share('train')} | {_fmt_ms(r.get('own_infer_ms'))} | {ratio('own_infer_vs_oft')} "
                         f"| {format_interval(r.get('own_infer_vs_oft_paired'))} | {share('infer')} |")
    if result["merge"]:
        lines += ["", "Merge (W R^T for a d x d weight):", "",
                  "| d | ours ms | ours / clone(W) | dense R ms | dense / ours | rel. err ours vs dense |",
                  "|---|---|---|---|---|---|"]
    for r in result["merge"]:
        if not r["correct"]:
            lines.append(f"| {r['d']} | FAILED CHECK (rel err {r['rel_err_vs_dense']:.2e}) | | | | |")
            continue
        o, c, dn = r["ours_ms"]["median"], r["clone_ms"]["median"], r["dense_ms"]["median"]
        lines.append(f"| {r['d']} | {o:.3f} | {o / c:.2f} | {dn:.3f} | {dn / o:.1f} | {r['rel_err_vs_dense']:.1e} |")
    return "\n".join(lines)


def write(result: dict, out_dir: str, name: str) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, f"{name}.json")]
    with open(paths[0], "w") as fh:
        json.dump(result, fh, indent=1)
    for table in ("kernel", "layer", "merge", "peers"):
        flat = [_flatten(r) for r in result.get(table, [])]
        keys = sorted({k for r in flat for k in r})
        path = os.path.join(out_dir, f"{name}-{table}.csv")
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=keys)
            writer.writeheader()
            writer.writerows(flat)
        paths.append(path)
    return paths


def _flatten(row: dict) -> dict:
    out = {}
    for k, v in row.items():
        if isinstance(v, dict):
            out.update({f"{k}_{kk}": vv for kk, vv in v.items()})
        else:
            out[k] = v
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--plan", choices=PLANS, default="full",
                        help="full: every table (the default); first: the peers table at four widths, a few "
                             "minutes on 2 cores (make bench); smoke: tiny shapes (writes nothing unless --out)")
    parser.add_argument("--quick", action="store_true", help="the same as --plan smoke")
    parser.add_argument("--out", default=None,
                        help=f"folder for the results (default {os.path.relpath(LATEST)}, ignored by git; "
                             f"{os.path.relpath(LATEST)}/first for --plan first)")
    parser.add_argument("--quiet", type=float, default=None, metavar="CPUS",
                        help="before each peers shape, wait (up to 10 min) until other processes use at most CPUS "
                             "cores")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = "smoke" if args.quick else args.plan
    full = GPU_PLAN if device.type == "cuda" else CPU_PLAN
    # a GPU times the kernels, not the CPU peers: its first look is the full plan
    plan = {"smoke": QUICK_PLAN, "first": FIRST_PLAN if device.type == "cpu" else full, "full": full}[name]
    # on a CPU, freed buffers stay in the process for every method alike (timing.steady_allocator)
    allocator = steady_allocator() if device.type == "cpu" else None
    if device.type == "cpu":
        print("No GPU: timing the PyTorch path of qgoft_kernels and the peers on the CPU, at small shapes "
              "(Triton kernels run only on a GPU; CPU numbers say nothing about GPU speed).", flush=True)
    start = time.time()
    result = {"meta": metadata(device, plan)}
    result["meta"]["allocator"] = allocator
    result["meta"]["plan"] = name
    result["kernel"] = kernel_rows(device, plan)
    result["layer"] = layer_rows(device, plan)
    result["merge"] = merge_rows(device, plan)
    result["peers"] = peer_rows(device, plan, args.quiet) if device.type == "cpu" else []
    result["meta"]["wall_seconds"] = round(time.time() - start, 1)
    print(tables(result))
    if name != "smoke" or args.out:
        out = args.out or (os.path.join(LATEST, "first") if name == "first" else LATEST)
        for path in write(result, out, slug(device)):
            print("wrote", os.path.relpath(path))
    print(f"benchmarks took {result['meta']['wall_seconds']} s")
    if result["peers"]:
        print("", "\n".join(peers_summary(result["peers"])), sep="\n")
    failed = [r for t in ("kernel", "layer", "merge", "peers") for r in result[t] if not r["correct"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
