"""Training time on whole models, the paper's Table 10 redone: ``python -m benchmarks.models --out <folder>``.

The paper names training time as qGOFT's limitation (App. H, Table 10: QNLI on
DeBERTaV3-base, 2x RTX 3090, seconds per batch): LoRA 1.12, AdaLoRA 1.43, OFT 1.80, GOFT
6.00, qGOFT 6.27. This command times one training step (forward, backward, optimizer step)
of whole models built from transformers configs with random weights (nothing is
downloaded), one fresh model per method:

- ``deberta``: the DeBERTaV3-base shape (DeBERTa-v2 architecture, 12 layers, hidden 768,
  FFN 3072, 2 labels as QNLI), every linear layer of every block adapted, batch 32 x 128
  tokens, bf16;
- ``llama``: the LLaMA-2-7B shape (32 layers, hidden 4096, FFN 11008, 32 heads), q, k, v, o
  adapted as in the paper's LLaMA runs, bf16 weights, batch 4 x 512 tokens, loss on the
  logits (next-token cross-entropy).

Methods: no adapter, PEFT LoRA, PEFT OFT, PEFT BOFT (only if its CUDA extension builds
within a minute), the paper's dense training path (:mod:`benchmarks.paper_dense`), GOFT,
GOFT + scale, and qGOFT with its penalty in the loss. Ours are put in with ``qk.inject`` (the
model-level API; ``GivensLinear`` sharing the frozen weights), the peers with
``peft.get_peft_model`` (:mod:`benchmarks.methods`' configs).

Phases (docs/benchmarks.md, "Whole models"):

1. compile and check our kernels at the timed shapes in parallel worker processes
   (:func:`benchmarks.gpu_quick.compile_all`: every launch checked against float64; a
   variant that fails gets no timing), while PEFT's BOFT extension builds in a subprocess;
2. per model and method: build, check that the adapted model at its identity start gives
   the no-adapter loss, warm up, then time ``--steps`` steps (CUDA events on a GPU, a wall
   clock on a CPU) and read the peak memory.

Every result is one JSON line appended to ``OUT/models.jsonl`` and flushed at once, so a
run cut short still returns data; the table comes last, beside the paper's ratios
(``--table FILE`` prints it again). ``--deadline`` stops the timing and prints what it has.

Without CUDA the command stops at once (exit 2). ``--dry-run`` (or ``--tiny`` on a machine
without CUDA) is the rehearsal on a CPU: tiny configs, the kernels in the Triton
interpreter, a wall clock; every line says ``dry_run: true`` and the table is headed NOT GPU
DATA. Its ratios mean nothing, and it refuses to write among the committed results.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn

import qgoft_kernels as qk
from qgoft_kernels.nn import module_uses, replace_modules

from . import gpu_quick
from .methods import boft_config, boft_factors_used, lora_config, oft_config, peft_version, peft_wrap
from .paper_dense import PaperDenseGivensLinear
from .provenance import TRITON_CACHE, interpreter_problem, require_cuda
from .run import format_interval, perturb

OUT_NAME = "models.jsonl"
SCHEMA = "models/1"
#: The paper's Table 10 (App. H): seconds per batch, QNLI, DeBERTaV3-base, 2x RTX 3090.
PAPER_SECONDS = {"LoRA": 1.12, "AdaLoRA": 1.43, "OFT": 1.80, "GOFT": 6.00, "qGOFT": 6.27}
#: The issue's targets: qGOFT's step at most LoRA's; the paper's dense method at least 5x qGOFT's.
TARGET_VS_LORA, TARGET_VS_PAPER = 1.0, 5.0
#: A method's loss at its identity start against the no-adapter loss (bf16 losses: one ulp is 0.4%).
CHECK_RTOL = 1e-2
BOFT_BLOCK, BOFT_FACTORS, BOFT_BUILD_LIMIT = 4, 2, 60.0
LR = 1e-4
#: Warm-up stops after two steps once a step takes longer than this.
SLOW_STEP_MS = 1000.0
#: Every line has exactly these keys (``None`` where one does not apply).
FIELDS = ("schema", "run_id", "dry_run", "tiny", "device", "device_type", "driver", "cuda", "torch", "triton",
          "transformers", "peft", "python", "numpy", "commit", "commit_source", "timer", "fp32_matmul", "env_pins",
          "kind", "model", "layers", "batch", "seq", "tokens", "dtype", "attention", "method", "method_key",
          "paper_row", "paper_ratio", "d", "rows", "block", "scale", "penalty_weight", "ok", "trainable",
          "adapter_params", "warmup", "steps", "times_ms", "median_ms", "q20_ms", "q80_ms", "wall_ms_per_step",
          "first_step_ms", "tokens_per_s", "peak_bytes", "resident_bytes", "ratio_to_lora", "loss", "penalty",
          "check", "seconds", "errors", "note")


def paper_ratio(row: str | None) -> float | None:
    """A Table 10 row's seconds per batch over LoRA's, rounded as the docs state them."""
    return None if row is None else round(PAPER_SECONDS[row] / PAPER_SECONDS["LoRA"], 2)


# --- the models ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSpec:
    key: str
    label: str
    arch: str  # "deberta-v2" (sequence classification) or "llama" (causal LM)
    config: dict  # the transformers config's fields
    batch: int
    seq: int
    #: the adapted nn.Linear layers: a regular expression over full module names, which
    #: PEFT's target_modules and qk.inject both take as is (a full match)
    targets: str
    #: modules every method trains besides its adapter (the classification head)
    head: tuple[str, ...]
    lora_r: int
    oft_block: int
    penalty: float  # qGOFT's lambda for this model in the paper

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    @property
    def layers(self) -> int:
        return self.config["num_hidden_layers"]


DEBERTA = ModelSpec(
    "deberta", "DeBERTaV3-base shape", "deberta-v2",
    # microsoft/deberta-v3-base's config; 2 labels as QNLI
    dict(vocab_size=128100, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
         hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, max_position_embeddings=512,
         type_vocab_size=0, initializer_range=0.02, layer_norm_eps=1e-7, relative_attention=True,
         max_relative_positions=-1, position_buckets=256, norm_rel_ebd="layer_norm", share_att_key=True,
         pos_att_type=["p2c", "c2p"], position_biased_input=False, pad_token_id=0, num_labels=2),
    batch=32, seq=128,
    targets=r".*\.(query_proj|key_proj|value_proj|attention\.output\.dense|intermediate\.dense|output\.dense)",
    head=("pooler", "classifier"), lora_r=8, oft_block=32, penalty=1e-3)
LLAMA = ModelSpec(
    "llama", "LLaMA-2-7B shape", "llama",
    # meta-llama/Llama-2-7b-hf's config
    dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
         num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
         hidden_act="silu", tie_word_embeddings=False),
    batch=4, seq=512, targets=r".*\.self_attn\.(q_proj|k_proj|v_proj|o_proj)", head=(), lora_r=16, oft_block=16,
    penalty=1e-2)
MODELS = {spec.key: spec for spec in (DEBERTA, LLAMA)}
#: The rehearsal's configs: the same architectures at widths 64/128; OFT's blocks divide them.
TINY = {
    "deberta": replace(DEBERTA, config={**DEBERTA.config, "vocab_size": 512, "hidden_size": 64,
                                        "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128,
                                        "max_position_embeddings": 64, "position_buckets": 16},
                       batch=2, seq=16),
    "llama": replace(LLAMA, config={**LLAMA.config, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 176,
                                    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
                                    "max_position_embeddings": 64},
                     batch=2, seq=16),
}


def _classes(spec: ModelSpec):
    import transformers

    if spec.arch == "deberta-v2":
        return transformers.DebertaV2Config, transformers.DebertaV2ForSequenceClassification
    return transformers.LlamaConfig, transformers.LlamaForCausalLM


def build_model(spec: ModelSpec, device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """``spec``'s model in ``dtype`` on ``device``, random weights (the same for every seed), frozen, in train mode."""
    config_cls, model_cls = _classes(spec)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_cls(config_cls(**spec.config))
    finally:
        torch.set_default_dtype(default)
    device = torch.device(device)
    if device.type != "meta":
        # our own draw: the same weights for every method, whatever transformers' initialisation does
        gen = torch.Generator(device=device).manual_seed(seed)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    m.weight.normal_(0.0, 0.02, generator=gen)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    m.bias.zero_()
    return model.requires_grad_(False).train()


def adapted_dims(spec: ModelSpec) -> list[int]:
    """The input widths of the adapted layers (from a model on the meta device: no memory)."""
    key = repr(spec)
    if key not in _DIMS:
        model = build_model(spec, "meta", torch.bfloat16)
        _DIMS[key] = sorted({m.in_features for name, m in model.named_modules()
                             if isinstance(m, nn.Linear) and re.fullmatch(spec.targets, name)})
    return _DIMS[key]


_DIMS: dict[str, list[int]] = {}


def make_batch(spec: ModelSpec, device, seed: int = 1) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, spec.config["vocab_size"], (spec.batch, spec.seq), generator=gen)
    labels = torch.randint(0, 2, (spec.batch,), generator=gen) if spec.arch == "deberta-v2" else ids
    return {"input_ids": ids.to(device), "labels": labels.to(device)}


# --- the methods --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Method:
    key: str
    kind: str  # "frozen", "peft", "ours" (qk.inject), "paper" (the dense path)
    paper_row: str | None  # its row of Table 10
    block: str | None = None
    scale: bool = False
    penalty: bool = False  # qGOFT: lambda * orthogonality_penalty(model) is added to the loss

    @property
    def kernels(self) -> bool:
        return self.kind == "ours"


#: In the order timed: LoRA first (every later ratio is to it), then qGOFT, then the cheap
#: rows; the two slow dense ones last (the paper's before BOFT: a target names it), so that
#: a deadline cuts the fewest rows.
METHODS = (
    Method("lora", "peft", "LoRA"),
    Method("qgoft", "ours", "qGOFT", "quasi", penalty=True),
    Method("frozen", "frozen", None),
    Method("goft", "ours", "GOFT", "givens"),
    Method("goft-scale", "ours", None, "givens", scale=True),
    Method("oft", "peft", "OFT"),
    Method("paper", "paper", "qGOFT", "quasi", penalty=True),
    Method("boft", "peft", None),
)
METHOD_KEYS = tuple(m.key for m in METHODS)


def method_label(method: Method, spec: ModelSpec) -> str:
    return {"lora": f"PEFT LoRA r={spec.lora_r}", "oft": f"PEFT OFT b={spec.oft_block}",
            "boft": f"PEFT BOFT b={BOFT_BLOCK} m={BOFT_FACTORS}", "frozen": "no adapter",
            "qgoft": f"qGOFT + penalty (lambda {spec.penalty:g})",
            "paper": f"paper's dense qGOFT + penalty (lambda {spec.penalty:g})",
            "goft": "GOFT", "goft-scale": "GOFT + scale"}[method.key]


def adapt(model: nn.Module, spec: ModelSpec, method: Method) -> tuple[nn.Module, str]:
    """Put ``method`` into ``model``; afterwards only its adapter and the head require grad."""
    note = ""
    if method.key == "lora":
        model, note = peft_wrap(model, lora_config(spec.lora_r, spec.targets))
    elif method.key == "oft":
        model, note = peft_wrap(model, oft_config(spec.oft_block, spec.targets))
    elif method.key == "boft":
        model, note = peft_wrap(model, boft_config(BOFT_BLOCK, BOFT_FACTORS, spec.targets))
        used = boft_factors_used(model)
        note = "; ".join(filter(None, [note, f"ran with m={used}" if used != BOFT_FACTORS else ""]))
    elif method.kind == "ours":
        qk.inject(model, spec.targets, block=method.block, scale=method.scale)
    elif method.kind == "paper":
        replace_modules(model, [(names, PaperDenseGivensLinear.from_linear(m, block=method.block, scale=method.scale))
                                for m, names in module_uses(model)
                                if type(m) is nn.Linear and any(re.fullmatch(spec.targets, n) for n in names)])
    for name, p in model.named_parameters():
        if any(part in spec.head for part in name.split(".")):
            p.requires_grad_(True)
    return model, note


def head_parameters(model: nn.Module, spec: ModelSpec) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if any(part in spec.head for part in name.split(".")))


def loss_fn(model: nn.Module, inputs: dict, labels, spec: ModelSpec, method: Method):
    """``(loss, penalty)``: the task loss, plus ``lambda * penalty`` for qGOFT (``penalty`` is then its value)."""
    loss = model(**inputs, labels=labels).loss
    if not method.penalty:
        return loss, None
    penalty = qk.orthogonality_penalty(model)
    return loss + spec.penalty * penalty, penalty


# --- phase 1: the kernels -----------------------------------------------------------------------

def variants(methods) -> list[tuple[str, bool]]:
    return sorted({(m.block, m.scale) for m in methods if m.kernels})


def units_for(spec: ModelSpec, methods) -> list[gpu_quick.Unit]:
    """The kernel specialisations a training step of ``spec`` launches for our ``methods``.

    Per adapted width and variant: the forward, the backward with ``dx``, and the backward
    without it (the first block's layers, whose input, the frozen embeddings, needs no gradient).
    """
    return [gpu_quick.Unit(path, d, block, scale, spec.tokens, need_dx)
            for d in adapted_dims(spec) for block, scale in variants(methods)
            for path, need_dx in (("forward", True), ("backward", True), ("backward", False))]


class BoftProbe:
    """PEFT's BOFT CUDA extension, built in a subprocess while the kernels compile; given up after a limit."""

    CODE = ("import sys, warnings\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always')\n"
            "    from peft.tuners.boft.layer import get_fbd_cuda\n"
            "    built = get_fbd_cuda() is not None\n"
            "print(*(f'warning: {w.message}' for w in caught), sep='\\n')\n"
            "sys.exit(0 if built else 3)\n")

    def __init__(self, log_path: str, limit: float = BOFT_BUILD_LIMIT):
        self.limit, self.log_path, self.start = limit, log_path, time.monotonic()
        self.log = open(log_path, "w")
        # its own process group: ninja and nvcc go with it if it runs past the limit
        self.proc = subprocess.Popen([sys.executable, "-c", self.CODE], stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def result(self) -> tuple[bool, str, float]:
        """``(built, note, seconds)``; waits for the rest of the limit at most."""
        try:
            self.proc.wait(timeout=max(0.0, self.limit - (time.monotonic() - self.start)))
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.log.close()
            return False, f"PEFT's BOFT CUDA extension did not build within {self.limit:.0f} s", self.limit
        self.log.close()
        seconds = time.monotonic() - self.start
        if self.proc.returncode == 0:
            return True, f"PEFT's BOFT CUDA extension built or loaded in {seconds:.0f} s", seconds
        with open(self.log_path, errors="replace") as fh:
            lines = [line.strip() for line in fh if line.strip()]
        # PEFT says why in a warning; else the last line (a traceback's)
        why = ([line.removeprefix("warning: ") for line in lines if line.startswith("warning: ")] + lines[-1:]
               or ["no output"])[0]
        return False, f"PEFT's BOFT CUDA extension did not build (exit {self.proc.returncode}: {why[:200]})", seconds


# --- phase 2: training steps --------------------------------------------------------------------

class OutOfTime(Exception):
    pass


@dataclass
class Context:
    device: torch.device
    dtype: torch.dtype
    deadline: float  # time.monotonic()
    steps: int
    warmup: int
    record: object
    kernels_ok: dict = field(default_factory=dict)  # {Unit: bool}
    boft: tuple[bool, str] = (False, "not probed")
    lora_ms: dict = field(default_factory=dict)  # {model key: LoRA's median}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(step, n: int, device: torch.device, deadline: float) -> tuple[list[float], float]:
    """``(per-step ms, wall ms per step)`` for up to ``n`` calls of ``step``, stopping at ``deadline``.

    GPU: a pair of CUDA events around each step, read after one synchronize at the end (the
    steps run back to back). CPU: ``time.perf_counter`` around each step.
    """
    _sync(device)
    start, done, times = time.perf_counter(), 0, []
    events = []
    for _ in range(n):
        if time.monotonic() > deadline:
            break
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            step()
            end.record()
            events.append((begin, end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
        done += 1
    _sync(device)
    wall = (time.perf_counter() - start) * 1e3 / max(1, done)
    if device.type == "cuda":
        times = [begin.elapsed_time(end) for begin, end in events]
    return times, wall


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@torch.no_grad()
def eval_loss(model: nn.Module, batch: dict) -> float:
    """The task loss without dropout: the check that an adapter starts at the identity."""
    model.eval()
    try:
        return float(model(input_ids=batch["input_ids"], labels=batch["labels"]).loss)
    finally:
        model.train()


@dataclass
class Prepared:
    """A method's model, built, adapted, checked at its start and perturbed, with its training step."""
    step: object  # () -> None: forward, loss (and penalty), backward, AdamW step
    last: dict  # the last step's "loss" and "penalty" (detached)
    fields: dict  # trainable, adapter_params, check, attention: a result line's fields
    note: str
    start_ok: bool  # the adapted model at its identity start gave the no-adapter loss


def prepare(spec: ModelSpec, method: Method, device, dtype: torch.dtype, base: nn.Module | None = None) -> Prepared:
    """``method`` on a fresh model of ``spec``, or on a copy of ``base`` (a :func:`build_model`
    model) that shares its frozen tensors: models of several methods side by side then hold one
    copy of the frozen weights; the head, which every method trains, is copied."""
    model = build_model(spec, device, dtype) if base is None else _sharing_copy(base, spec)
    batch = make_batch(spec, device)
    reference = eval_loss(model, batch)
    model, note = adapt(model, spec, method)
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    start_loss = eval_loss(model, batch)
    rel = abs(start_loss - reference) / max(abs(reference), 1e-6)
    check = {"loss_no_adapter": reference, "loss_at_start": start_loss, "rel_diff": rel, "rtol": CHECK_RTOL}
    fields = dict(trainable=trainable, adapter_params=trainable - head_parameters(model, spec), check=check,
                  attention=getattr(model.config, "_attn_implementation", None))
    # off the identity start, as in training: at exactly R = I the paper's dense path stores
    # only the diagonal of each stage matrix (.to_sparse() drops zeros) and gives the
    # off-diagonal entries no gradient; a trained adapter has them all
    perturb(model)
    optimizer = torch.optim.AdamW(params, lr=LR) if params else None
    inputs = {"input_ids": batch["input_ids"]}
    if method.kind == "frozen":
        # the loss's gradient goes back to the input embeddings: the backward through every
        # block that all adapters pay (no adapter, nothing else to differentiate)
        embeds = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_()
        inputs = {"inputs_embeds": embeds}
    last = {}

    def step():
        loss, penalty = loss_fn(model, inputs, batch["labels"], spec, method)
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if method.kind == "frozen":
            embeds.grad = None
        last["loss"], last["penalty"] = loss.detach(), None if penalty is None else penalty.detach()

    return Prepared(step, last, fields, note, math.isfinite(start_loss) and rel <= CHECK_RTOL)


def _sharing_copy(base: nn.Module, spec: ModelSpec) -> nn.Module:
    import copy

    head = {id(p) for name, p in base.named_parameters() if any(part in spec.head for part in name.split("."))}
    shared = {id(t): t for t in [*base.parameters(), *base.buffers()] if id(t) not in head}
    return copy.deepcopy(base, memo=dict(shared))


def measure(spec: ModelSpec, method: Method, ctx: Context) -> dict | None:
    """Build, adapt, check, warm up and time one method on one model; one ``step`` line."""
    device = ctx.device
    common = dict(kind="step", model=spec.key, layers=spec.layers, batch=spec.batch, seq=spec.seq,
                  tokens=spec.tokens, dtype=str(ctx.dtype).removeprefix("torch."), method=method_label(method, spec),
                  method_key=method.key, paper_row=method.paper_row, paper_ratio=paper_ratio(method.paper_row),
                  block=method.block, scale=method.scale if method.block else None,
                  penalty_weight=spec.penalty if method.penalty else None, warmup=ctx.warmup)
    # ok=None: skipped as the protocol says, neither a result nor a failure
    if method.kind == "peft" and peft_version() is None:
        return ctx.record(**common, ok=None, note="skipped: PEFT is not installed")
    if method.key == "boft" and not ctx.boft[0]:
        if device.type == "cuda":
            return ctx.record(**common, ok=None, note=f"skipped: {ctx.boft[1]}")
        common["note"] = f"rehearsal only: {ctx.boft[1]}; a GPU run skips this row"
    if method.kernels:
        failed = [u.name for u in units_for(spec, [method]) if not ctx.kernels_ok.get(u)]
        if failed:
            return ctx.record(**common, ok=False, note="kernel check failed or unfinished: no timing",
                              errors={"units": failed})
    if time.monotonic() > ctx.deadline:
        return ctx.record(**common, ok=False, note="not run: past the deadline")
    start = time.monotonic()
    prepared = prepare(spec, method, device, ctx.dtype)
    note = "; ".join(filter(None, [common.pop("note", ""), prepared.note]))
    common.update(prepared.fields)
    if not prepared.start_ok:
        if method.kind in ("ours", "paper"):
            return ctx.record(**common, ok=False, note="the adapted model at its start does not give the "
                                                        "no-adapter loss: no timing")
        note = "; ".join(filter(None, [note, "start-loss check failed"]))
    step, last = prepared.step, prepared.last
    first = None
    for i in range(ctx.warmup):
        if time.monotonic() > ctx.deadline:
            raise OutOfTime
        t0 = time.perf_counter()
        step()
        _sync(device)
        took = (time.perf_counter() - t0) * 1e3
        first = first if i else took
        # a slow step (the dense methods on LLaMA) is steady from the second: save the time
        if i >= 1 and took > SLOW_STEP_MS:
            break
    common["warmup"] = i + 1
    resident = peak = None
    if device.type == "cuda":
        resident = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    times, wall = time_steps(step, ctx.steps, device, ctx.deadline)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    if not times:
        raise OutOfTime
    loss = float(last["loss"])
    penalty = None if last["penalty"] is None else float(last["penalty"])
    median = statistics.median(times)
    short = len(times) < ctx.steps
    if method.key == "lora":
        ctx.lora_ms[spec.key] = median
    lora = ctx.lora_ms.get(spec.key)
    if short:
        note = "; ".join(filter(None, [note, f"only {len(times)} of {ctx.steps} steps before the deadline"]))
    return ctx.record(**common, ok=math.isfinite(loss) and not short, steps=len(times),
                      times_ms=[round(t, 4) for t in times], median_ms=median, q20_ms=quantile(times, 0.2),
                      q80_ms=quantile(times, 0.8), wall_ms_per_step=wall, first_step_ms=first,
                      tokens_per_s=spec.tokens / (median * 1e-3), peak_bytes=peak, resident_bytes=resident,
                      ratio_to_lora=None if lora is None else median / lora, loss=loss, penalty=penalty,
                      seconds=round(time.monotonic() - start, 1), note=note or None)


def run_method(spec: ModelSpec, method: Method, ctx: Context) -> None:
    """:func:`measure`, with out-of-memory, errors and the deadline recorded as lines; memory freed after."""
    failure = None
    try:
        measure(spec, method, ctx)
    except OutOfTime:
        failure = dict(note="not timed: the deadline came before its timed steps")
    except torch.cuda.OutOfMemoryError as exc:
        failure = dict(note=f"out of memory with {spec.layers} layers: {str(exc).splitlines()[0][:200]}")
    except Exception as exc:  # a peer this PEFT or transformers version cannot build or run: the others go on
        failure = dict(note=f"raised: {type(exc).__name__}: {exc}"[:300],
                       errors={"traceback": traceback.format_exc(limit=6)[-3000:]})
    if failure:
        ctx.record(kind="step", model=spec.key, layers=spec.layers, batch=spec.batch, seq=spec.seq,
                   tokens=spec.tokens, method=method_label(method, spec), method_key=method.key,
                   paper_row=method.paper_row, paper_ratio=paper_ratio(method.paper_row), ok=False, **failure)
    gc.collect()
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()


def record_targets(spec: ModelSpec, ctx: Context) -> None:
    """One ``targets`` line per model: qGOFT over LoRA, the paper's dense method over qGOFT."""
    rows = {r["method_key"]: r for r in ctx.record.rows
            if r["kind"] == "step" and r["model"] == spec.key and r["ok"]}

    def ms(key):
        return rows[key]["median_ms"] if key in rows else None

    vs_lora = None if ms("qgoft") is None or ms("lora") is None else ms("qgoft") / ms("lora")
    vs_paper = None if ms("qgoft") is None or ms("paper") is None else ms("paper") / ms("qgoft")
    judged = not ctx.record.meta["tiny"] and vs_lora is not None and vs_paper is not None
    ctx.record(kind="targets", model=spec.key, layers=spec.layers, tokens=spec.tokens,
               ok=(vs_lora <= TARGET_VS_LORA and vs_paper >= TARGET_VS_PAPER) if judged else None,
               check={"qgoft_over_lora": vs_lora, "target_qgoft_over_lora": TARGET_VS_LORA,
                      "paper_over_qgoft": vs_paper, "target_paper_over_qgoft": TARGET_VS_PAPER})


# --- output -------------------------------------------------------------------------------------

def _fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
    """The run's summary: per model, every method beside the paper's Table 10 ratio."""
    if not rows:
        return "no results"
    meta = rows[0]
    dry = meta["dry_run"] or meta["tiny"]
    where = "CPU DRY RUN (tiny configs)" if meta["device_type"] == "cpu" else f"TINY CONFIGS on {meta['device']}"
    what = "NOT GPU DATA" if meta["device_type"] == "cpu" else "NOT A RESULT"
    head = (f"{where}: a rehearsal of the pipeline, {what}; its timings and ratios mean nothing" if dry
            else f"WHOLE-MODEL TRAINING STEP on {meta['device']}")
    lines = [head, f"torch {meta['torch']}, triton {meta['triton']}, transformers {meta['transformers']}, peft "
                   f"{meta['peft']}, python {meta['python']}, numpy {meta['numpy']}, driver {meta['driver']}, CUDA "
                   f"{meta['cuda']}; commit {meta['commit']} ({meta['commit_source']}); pins "
                   f"{meta['env_pins'] or 'none'}", f"timer: {meta['timer']}",
             "Paper's ratios: Table 10 of arXiv 2404.04316 (QNLI, DeBERTaV3-base, 2x RTX 3090), seconds per batch "
             "over LoRA's: " + ", ".join(f"{k} {paper_ratio(k):.2f}" for k in PAPER_SECONDS), ""]
    compiled = [r for r in rows if r["kind"] == "compile"]
    failed = [r for r in compiled if not r["ok"]]
    lines.append(f"Kernels compiled and checked against float64: {len(compiled) - len(failed)}/{len(compiled)} pass"
                 + "".join(f"\n  FAILED {r['method']} d={r['d']} rows={r['rows']} {r['block']} scale={r['scale']}: "
                           f"{r['note']}" for r in failed))
    for r in rows:
        if r["kind"] == "boft":
            lines.append(f"PEFT BOFT extension: {r['note']}")
    for key in dict.fromkeys(r["model"] for r in rows if r["kind"] == "step"):
        steps = [r for r in rows if r["kind"] == "step" and r["model"] == key]
        first = steps[0]
        spec = MODELS[key]
        lines += ["", f"{spec.label if not dry else 'tiny ' + spec.label}: {first['layers']} layers, batch "
                      f"{first['batch']} x {first['seq']} tokens, {first['dtype'] or 'bfloat16'}; one step = "
                      "forward + backward + AdamW step:", "",
                  "| method | Table 10 row | paper's ratio to LoRA | step ms (median) | q20-q80 ms | steps "
                  "| tokens/s | peak GiB | trainable (adapter) | ratio to LoRA |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in steps:
            paper = f"{r['paper_row']} | {_fmt(r['paper_ratio'])}" if r["paper_row"] else "- | -"
            if r["median_ms"] is None:
                lines.append(f"| {r['method']} | {paper} | NOT TIMED: {r['note']} | | | | | | |")
                continue
            peak = "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**30:.1f}"
            flag = "" if r["ok"] else " (INCOMPLETE)"
            lines.append(f"| {r['method']}{flag} | {paper} | {r['median_ms']:.2f} | {r['q20_ms']:.2f}-"
                         f"{r['q80_ms']:.2f} | {r['steps']} | {r['tokens_per_s']:,.0f} | {peak} "
                         f"| {r['trainable']:,} ({r['adapter_params']:,}) | {_fmt(r['ratio_to_lora'])} |")
        lines.append(f"| (AdaLoRA: not run) | AdaLoRA | {paper_ratio('AdaLoRA'):.2f} | | | | | | | |")
        notes = [f"  {r['method']}: {r['note']}" for r in steps if r["note"] and r["median_ms"] is not None]
        if notes:
            lines += ["", "Notes:"] + notes
        target = [r for r in rows if r["kind"] == "targets" and r["model"] == key]
        if target:
            c = target[-1]["check"]
            if dry:
                lines += ["", "Targets: not judged on a rehearsal."]
            else:
                def verdict(value, bound, le):
                    if value is None:
                        return "not measured"
                    return "met" if (value <= bound if le else value >= bound) else "MISSED"

                lines += ["", f"Targets: qGOFT / LoRA = {_fmt(c['qgoft_over_lora'])} (at most "
                              f"{TARGET_VS_LORA:.1f}: {verdict(c['qgoft_over_lora'], TARGET_VS_LORA, True)}); "
                              f"paper's dense / qGOFT = {_fmt(c['paper_over_qgoft'])} (at least {TARGET_VS_PAPER:.0f}: "
                              f"{verdict(c['paper_over_qgoft'], TARGET_VS_PAPER, False)})"]
    summary = [r for r in rows if r["kind"] == "summary"]
    if summary:
        lines += ["", f"{summary[-1]['note']}; {summary[-1]['seconds']:.0f} s in all."]
    return "\n".join(lines)


# --- the CPU table (--device cpu) ----------------------------------------------------------------

#: DeBERTaV3-base's shape at a batch a 2-core CPU trains in seconds per step, in float32 (a
#: CPU trains in fp32); our methods take the PyTorch path there (no Triton on a CPU).
CPU_BATCH, CPU_SEQ = 4, 128
CPU_DTYPE = torch.float32


def cpu_spec(tiny: bool = False) -> ModelSpec:
    return TINY["deberta"] if tiny else replace(DEBERTA, batch=CPU_BATCH, seq=CPU_SEQ)


def cpu_run(spec: ModelSpec, methods, rounds: int, warmup: int, progress: bool = True) -> dict:
    """One training step of every method, ``rounds`` times, from one interleaved run.

    Every method's model is built first (each a copy of one model sharing its frozen weights,
    :func:`prepare`: adapted, checked at its identity start and perturbed). After ``warmup``
    untimed steps each, every round times one step of every method, in an order shuffled per
    round (``time.perf_counter`` around the step), so a change of load hits all methods of a
    round alike. A method's ratio to LoRA is the median over rounds of its step over LoRA's
    step of the same round, with the distribution-free 95% interval
    (:func:`benchmarks.timing.paired_ratio`). Methods whose start-loss check fails are still
    timed, and flagged."""
    import random

    from .timing import paired_ratio

    device = torch.device("cpu")
    prepared, seconds = {}, {}
    base = build_model(spec, device, CPU_DTYPE)
    for method in methods:
        start = time.monotonic()
        prepared[method.key] = prepare(spec, method, device, CPU_DTYPE, base)
        seconds[method.key] = time.monotonic() - start
        if progress:
            print(f"built {method_label(method, spec)} ({seconds[method.key]:.0f} s)", flush=True)
    for key, p in prepared.items():
        for _ in range(warmup):
            p.step()
    times = {key: [] for key in prepared}
    shuffle = random.Random(0)
    for r in range(rounds):
        order = list(prepared)
        shuffle.shuffle(order)
        for key in order:
            t0 = time.perf_counter()
            prepared[key].step()
            times[key].append((time.perf_counter() - t0) * 1e3)
        if progress:
            print(f"round {r + 1}/{rounds}: " + ", ".join(f"{k} {times[k][-1] / 1e3:.2f} s" for k in prepared),
                  flush=True)
    rows = []
    for method in methods:
        p, t = prepared[method.key], times[method.key]
        rows.append(dict(method=method_label(method, spec), method_key=method.key, paper_row=method.paper_row,
                         paper_ratio=paper_ratio(method.paper_row), times_ms=t,
                         median_ms=statistics.median(t), ratio_to_lora=paired_ratio(t, times["lora"]),
                         loss=float(p.last["loss"]), start_ok=p.start_ok, note=p.note or None,
                         build_seconds=round(seconds[method.key], 1), **p.fields))
    return {"model": spec.key, "label": spec.label, "layers": spec.layers, "batch": spec.batch, "seq": spec.seq,
            "dtype": str(CPU_DTYPE).removeprefix("torch."), "rounds": rounds, "warmup": warmup, "rows": rows}


def cpu_table(result: dict) -> str:
    """The CPU run's table: every method's step and its ratio to LoRA beside Table 10's."""
    meta = result["meta"]
    lines = [f"{result['label']} ({result['layers']} layers), batch {result['batch']} x {result['seq']} tokens, "
             f"{result['dtype']}, every linear layer of every block adapted; one step = forward + backward + AdamW "
             f"step; {meta['device']}; torch {meta['torch']}, transformers {meta['transformers']}, peft "
             f"{meta['peft']}; commit {meta['commit']}; {result['rounds']} rounds after {result['warmup']} "
             "untimed step(s) each, every method once a round in a shuffled order.", "",
             "| method | Table 10 row | paper's ratio to LoRA (GPU) | step s (median) | ratio to LoRA here "
             "[95% interval] | trainable (adapter) |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        paper = f"{r['paper_row']} | {r['paper_ratio']:.2f}" if r["paper_row"] else "- | -"
        ratio = r["ratio_to_lora"]
        flag = "" if r["start_ok"] else " (start-loss check FAILED)"
        lines.append(f"| {r['method']}{flag} | {paper} | {r['median_ms'] / 1e3:.2f} | "
                     f"{format_interval(ratio) if r['method_key'] != 'lora' else '1'} | "
                     f"{r['trainable']:,} ({r['adapter_params']:,}) |")
    lines.append(f"| (AdaLoRA: not run) | AdaLoRA | {paper_ratio('AdaLoRA'):.2f} | | | |")
    notes = [f"{r['method']}: {r['note']}" for r in result["rows"] if r["note"]]
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines)


def cpu_main(args, chosen: set[str]) -> int:
    """``--device cpu``: the step-time table on this CPU (the PyTorch path), as one JSON file."""
    from .run import device_name, slug
    from .timing import steady_allocator

    if args.tiny and gpu_quick.among_results(args.out):
        raise SystemExit("a tiny-config run is not a result: write it outside benchmarks/results/")
    if os.environ.pop("TRITON_INTERPRET", None) not in (None, "", "0"):
        print("note: TRITON_INTERPRET was set: ignored, the CPU table times the PyTorch path")
    methods = [m for m in METHODS if m.key in chosen]
    spec = cpu_spec(args.tiny)
    if args.layers:
        spec = replace(spec, config={**spec.config, "num_hidden_layers": args.layers})
    start = time.monotonic()
    # freed buffers stay in the process, as in the peers table: no page faults in the timed steps
    # (not for the tiny check, which may share its process with others)
    allocator = None if args.tiny else steady_allocator()
    result = cpu_run(spec, methods, args.steps, args.warmup)
    import transformers

    device = torch.device("cpu")
    result["meta"] = {**gpu_quick.run_metadata(device, False, "wall clock, time.perf_counter around each step"),
                      "device": device_name(device), "threads": torch.get_num_threads(), "tiny": args.tiny,
                      "transformers": transformers.__version__, "peft": peft_version(), "allocator": allocator,
                      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                      "wall_seconds": round(time.monotonic() - start, 1)}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"models-cpu-{slug(device)}.json")
    with open(path, "w") as fh:
        json.dump(result, fh, indent=1)
    print(cpu_table(result))
    print("wrote", os.path.relpath(path))
    return 0


# --- the command --------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.models", description=__doc__.splitlines()[0])
    parser.add_argument("--out", help=f"folder for {OUT_NAME} (appended to) and the BOFT build log")
    parser.add_argument("--model", choices=("deberta", "llama", "both"), default="both")
    parser.add_argument("--methods", default=",".join(METHOD_KEYS),
                        help=f"comma-separated, from {','.join(METHOD_KEYS)} (default: all; lora is always run)")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny configs (a pipeline check, never a result); on a machine without CUDA, the dry run")
    parser.add_argument("--dry-run", action="store_true",
                        help="the rehearsal on the CPU: tiny configs, Triton interpreter, wall clock (not GPU data)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per method (default 10; with --device cpu, rounds, default 8)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; --device cpu: 1)")
    parser.add_argument("--layers", type=int, default=None,
                        help="override the layer count (only if memory forces it; every line states it)")
    parser.add_argument("--deadline", type=float, default=390.0,
                        help="seconds from the start after which timing stops and the table is printed; the "
                             "compile phase gets 40%% of it (default 390)")
    parser.add_argument("--workers", type=int, default=None, help="compile processes (default: CPU count, at most 16)")
    parser.add_argument("--table", metavar="JSONL", help="print the table of the last run in this file and exit")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: the table on this CPU (DeBERTaV3-base's shape, batch "
                             f"{CPU_BATCH} x {CPU_SEQ}, fp32, the PyTorch path), every method in one interleaved "
                             "run, --steps rounds (default 8), written as models-cpu-<machine>.json")
    args = parser.parse_args(argv)
    chosen = {k.strip() for k in args.methods.split(",") if k.strip()} | {"lora"}
    if chosen - set(METHOD_KEYS):
        parser.error(f"--methods takes names from {','.join(METHOD_KEYS)}, got {args.methods!r}")
    cpu = args.device == "cpu"
    args.steps = args.steps if args.steps is not None else 8 if cpu else 10
    args.warmup = args.warmup if args.warmup is not None else 1 if cpu else 3
    if cpu:
        if not args.out:
            parser.error("--out is required")
        if args.steps < 1 or args.warmup < 0:
            parser.error("--steps must be at least 1, --warmup at least 0")
        return cpu_main(args, chosen)
    start = time.monotonic()
    os.environ.setdefault("TRITON_CACHE_DIR", TRITON_CACHE)
    if args.table:
        print(table(gpu_quick.read_last_run(args.table)))
        return 0
    if not args.out:
        parser.error("--out is required")
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be at least 1")
    dry = args.dry_run or (args.tiny and not torch.cuda.is_available())
    tiny = args.tiny or dry
    if tiny and gpu_quick.among_results(args.out):
        parser.error("a tiny-config run is not a result: write it outside benchmarks/results/ "
                     "(or to its ignored latest/)")
    if dry:
        # the interpreter runs the kernels on the CPU; it must be set before they are defined
        os.environ["TRITON_INTERPRET"] = "1"
        problem = interpreter_problem()
        if problem:
            print(f"models --dry-run: {problem}", file=sys.stderr)
            return 2
        device = torch.device("cpu")
        # tiny models: one thread is many times faster than several on a shared, busy CPU
        torch.set_num_threads(1)
    else:
        if not require_cuda("python -m benchmarks.models"):
            return 2
        device = torch.device("cuda")
    # poisoned outputs add a fill to every launch: the workers' checks use them, the timings must not
    os.environ.pop("QGOFT_POISON", None)
    specs = [(TINY if tiny else MODELS)[k] for k in (("deberta", "llama") if args.model == "both" else (args.model,))]
    if args.layers:
        specs = [replace(s, config={**s.config, "num_hidden_layers": args.layers}) for s in specs]
    methods = [m for m in METHODS if m.key in chosen]
    os.makedirs(args.out, exist_ok=True)
    timer = ("CUDA events around each step, steps back to back, one synchronize after the last" if device.type == "cuda"
             else "wall clock, time.perf_counter around each step (CPU dry run, not GPU data)")
    import transformers

    meta = {**gpu_quick.run_metadata(device, dry, timer), "schema": SCHEMA, "tiny": tiny,
            "transformers": transformers.__version__,
            # "highest": fp32 matmuls (the paper's dense x @ R) run in fp32, not TF32
            "fp32_matmul": torch.get_float32_matmul_precision()}
    record = gpu_quick.Recorder(os.path.join(args.out, OUT_NAME), meta, FIELDS)
    ctx = Context(device, torch.bfloat16, start + args.deadline, args.steps, args.warmup, record)
    units = sorted({u for s in specs for u in units_for(s, methods)}, key=gpu_quick.unit_cost)
    workers = args.workers or min(16, os.cpu_count() or 1, max(1, len(units)))
    print(f"{'CPU dry run (tiny configs)' if dry else 'tiny configs' if tiny else 'GPU run'}: "
          f"{', '.join(s.label for s in specs)}; {len(methods)} methods; {len(units)} kernel specialisations to "
          f"compile and check in {workers} processes; deadline {args.deadline:.0f} s; writing {record.path}",
          flush=True)
    probe = BoftProbe(os.path.join(args.out, "boft-build.log")) if "boft" in chosen and peft_version() else None
    if units:
        ctx.kernels_ok = gpu_quick.compile_all(units, ctx.dtype, 256, device, workers, start + 0.4 * args.deadline,
                                               record)
    print(f"compile phase: {sum(ctx.kernels_ok.values())}/{len(units)} pass, {time.monotonic() - start:.0f} s",
          flush=True)
    if probe is not None:
        built, note, seconds = probe.result()
        ctx.boft = (built, note)
        record(kind="boft", ok=built, seconds=round(seconds, 1), note=note)
        print(note, flush=True)
    for spec in specs:
        for method in methods:
            print(f"{spec.key}: {method_label(method, spec)}", flush=True)
            run_method(spec, method, ctx)
        record_targets(spec, ctx)
    steps = [r for r in record.rows if r["kind"] == "step"]
    all_ok = all(r["ok"] is not False for r in record.rows if r["kind"] in ("compile", "step"))
    past = time.monotonic() > ctx.deadline
    record(kind="summary", ok=all_ok, seconds=round(time.monotonic() - start, 1),
           note=(f"stopped at the deadline ({args.deadline:.0f} s)" if past else "finished")
           + ("" if all_ok else f" with {sum(r['ok'] is False for r in steps)} of {len(steps)} methods "
                                    "not fully timed"))
    print(table(record.rows))
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
