"""Training memory of the adapted layers, measured on meta tensors: ``python -m benchmarks.memory``.

For three model shapes (configs only, nothing allocated: every tensor is on the ``meta``
device) and batches of 512 to 65,536 tokens, each method is put on the attention's q, k, v and
o projections of every layer (the paper's targets for LLaMA) and this counts, per model:

- the adapter's trainable parameters, their gradients and AdamW's two moments (bytes of each
  tensor as the method creates it: PEFT keeps its adapters in fp32, so do we);
- the activations each adapted layer saves for the backward *beyond what the frozen layer
  saves* (its weight), measured by ``torch.autograd.graph.saved_tensors_hooks`` around one
  forward of the layer on a ``[tokens, d]`` bf16 input that requires grad, as inside a model:
  the distinct storages autograd keeps, each counted once.

Methods: GOFT and qGOFT (with and without scale), each twice: through the custom op of the GPU
path (``qgoft::rotate``, whose fake implementation runs on meta and whose autograd saves what a
GPU saves: ``x`` in its own dtype and the parameters) and through the PyTorch path (the ATen
formulation a CPU without the compiled kernels runs, and what ``GivensLinear`` runs on meta);
PEFT LoRA r=8 and r=16, OFT b=32 and BOFT (b=4, m=2); the paper's dense method, whose
construction of ``R`` runs on real CPU tensors (``Tensor.to_sparse`` has no meta kernel; see
:func:`paper_layer_memory`).

With activation checkpointing (transformers' ``gradient_checkpointing_enable``, which works the
same for every method here: PEFT's, ours and the paper's layers are plain modules inside the
checkpointed block), each block keeps only its input through the forward, and the backward
rebuilds one block's activations at a time. Both parts are measured by the same hooks: what
each adapted layer saves beyond the frozen layer when run under
``torch.utils.checkpoint.checkpoint`` (its reentrant form, which saves its inputs through
autograd, so the hooks see them), for every layer of the model; plus what one block's layers
save when it is rebuilt (the count above, for one layer instead of all).

Writes ``memory.json`` in ``--out`` (default ``benchmarks/results/latest/``); ``make
bench-publish`` copies it to the committed results and the report puts its table in
docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import qgoft_kernels.ops  # noqa: F401  (registers qgoft::rotate)

from .methods import Method, make_linear, methods
from .paper_dense import PaperDenseGivensLinear
from .provenance import commit_id
from .timing import saved_bytes

#: (hidden width, width of k and v, layers) of each model's attention
MODELS = {
    "DeBERTaV3-base": (768, 768, 12),
    "LLaMA-2-7B": (4096, 4096, 32),
    "LLaMA-3-70B": (8192, 1024, 80),
}
TINY_MODELS = {"tiny": (64, 32, 2)}
TOKENS = (512, 2048, 8192, 32768, 65536)
#: ours twice: through the custom op of the GPU (Triton) path, and through the PyTorch path (what a
#: CPU without the compiled kernels runs: ATen ops, also what runs on meta tensors)
GPU, CPU = " (GPU path)", " (PyTorch path)"
OURS = ("GOFT givens", "GOFT givens+scale", "qGOFT quasi", "qGOFT quasi+scale")
PAPER = "paper dense qGOFT"
METHODS = (*(n + GPU for n in OURS), *(n + CPU for n in OURS), "PEFT LoRA r=8", "PEFT LoRA r=16",
           "PEFT OFT b=32", "PEFT BOFT b=4 m=2", PAPER)
FROZEN = "frozen nn.Linear"
DTYPE = torch.bfloat16


@dataclass
class LayerMemory:
    trainable: int  # parameters
    param_bytes: int
    saved_bytes: int  # beyond the frozen layer's
    checkpointed_bytes: int  # beyond the frozen layer's, both run under torch.utils.checkpoint


def _checkpointed(module: nn.Module, x: torch.Tensor) -> int:
    """What ``module(x)`` saves under activation checkpointing (the reentrant form: its inputs
    go through ``save_for_backward``, which the hooks see; the forward runs without grad)."""
    from torch.utils.checkpoint import checkpoint

    # no RNG state to stash for a meta tensor; nothing here draws random numbers
    return saved_bytes(lambda: checkpoint(module, x, use_reentrant=True, preserve_rng_state=False))


class _TritonPath(nn.Module):
    """A :class:`GivensLinear` through the custom op its GPU forward calls (``qgoft::rotate``, then
    the frozen linear): on meta tensors the op's fake implementation runs and its registered
    autograd saves what it saves on a GPU."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        m = self.layer
        return F.linear(torch.ops.qgoft.rotate(x, m.rotation, m.scale, m.block, m.structure, False), m.weight, m.bias)


def paper_layer_memory(d: int, k: int, tokens: int, block: str = "quasi") -> LayerMemory:
    """The paper's dense method (:class:`benchmarks.paper_dense.PaperDenseGivensLinear`), whose
    forward is ``F.linear((x.float() @ R).to(x.dtype), W, b)`` with ``R`` built stage by stage
    through ``to_sparse``, which has no meta kernel: ``R``'s construction runs on real CPU tensors
    (it does not depend on the tokens), the rest on meta tensors, each measured by the same hooks;
    the two parts share nothing, so their sum is the whole forward's (a test checks that on a
    small layer run whole on the CPU)."""
    construction, trainable, param_bytes = _paper_construction(d, block)
    x = torch.empty(tokens, d, device="meta", dtype=DTYPE, requires_grad=True)
    R = torch.empty(d, d, device="meta", dtype=torch.float32, requires_grad=True)
    W = torch.empty(k, d, device="meta", dtype=DTYPE)
    b = torch.empty(k, device="meta", dtype=DTYPE)
    product = saved_bytes(lambda: F.linear((x.float() @ R).to(x.dtype), W, b))
    frozen = saved_bytes(lambda: F.linear(x, W, b))
    return LayerMemory(trainable, param_bytes, construction + product - frozen, _paper_checkpointed(d, k))


@functools.lru_cache(maxsize=None)
def _paper_checkpointed(d: int, k: int, rows: int = 16) -> int:
    """The paper's layer under checkpointing, beyond the frozen layer's: run whole on real CPU
    tensors (its ``to_sparse``) with ``rows`` rows, whatever the batch: a checkpointed forward
    saves its tensor inputs only, so the difference to the frozen layer, which has the same
    input, does not grow with the rows (a test checks it at two row counts)."""
    base = make_linear(d, k, "cpu", DTYPE)
    layer = PaperDenseGivensLinear.from_linear(base, block="quasi")
    x = torch.zeros(rows, d, dtype=DTYPE, requires_grad=True)
    return _checkpointed(layer, x) - _checkpointed(base, x)


@functools.lru_cache(maxsize=None)
def _paper_construction(d: int, block: str) -> tuple[int, int, int]:
    """What building the paper's ``R`` saves (it depends on ``d`` only), and its parameters."""
    layer = PaperDenseGivensLinear.from_linear(make_linear(d, 1, "cpu", DTYPE), block=block)
    params = [p for p in layer.parameters() if p.requires_grad]
    return (saved_bytes(layer.dense_rotation), sum(p.numel() for p in params),
            sum(p.numel() * p.element_size() for p in params))


def _method(name: str, d: int, k: int) -> Method:
    if name.endswith(GPU):
        ours = next(m for m in methods(d, k, False) if m.name == name.removesuffix(GPU))
        return Method(name, ours.family, lambda base: (_TritonPath(ours.build(base)[0]), ""))
    return next(m for m in methods(d, k, True) if m.name == name.removesuffix(CPU))


def layer_memory(name: str, d: int, k: int, tokens: int) -> LayerMemory:
    """One ``d -> k`` layer with method ``name``, on meta tensors, at ``tokens`` rows."""
    if name == PAPER:
        return paper_layer_memory(d, k, tokens)
    method = _method(name, d, k)
    frozen = _method(FROZEN, d, k)

    def saved(m) -> tuple[int, int, int, int]:
        base = make_linear(d, k, "meta", DTYPE)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module, _ = m.build(base)
        x = torch.empty(tokens, d, device="meta", dtype=DTYPE, requires_grad=True)
        params = [p for p in module.parameters() if p.requires_grad]
        return (saved_bytes(lambda: module(x)), _checkpointed(module, x), sum(p.numel() for p in params),
                sum(p.numel() * p.element_size() for p in params))

    frozen_saved, frozen_checkpointed, _, _ = saved(frozen)
    total, checkpointed, trainable, param_bytes = saved(method)
    return LayerMemory(trainable, param_bytes, total - frozen_saved, checkpointed - frozen_checkpointed)


def model_rows(model: str, shape: tuple[int, int, int], names, tokens_list) -> list[dict]:
    hidden, kv, layers = shape
    targets = {"q": (hidden, hidden), "k": (hidden, kv), "v": (hidden, kv), "o": (hidden, hidden)}
    rows = []
    for name in names:
        for tokens in tokens_list:
            per = {t: layer_memory(name, d, k, tokens) for t, (d, k) in targets.items()}
            params = layers * sum(m.param_bytes for m in per.values())
            rows.append({"model": model, "method": name, "tokens": tokens, "layers": layers,
                         "targets": {t: list(s) for t, s in targets.items()},
                         "trainable": layers * sum(m.trainable for m in per.values()),
                         "param_bytes": params, "grad_bytes": params, "adamw_bytes": 2 * params,
                         "saved_bytes": layers * sum(m.saved_bytes for m in per.values()),
                         "saved_bytes_per_target": {t: m.saved_bytes for t, m in per.items()},
                         # activation checkpointing: every layer's checkpointed forward, and one
                         # block's layers rebuilt with grad in the backward
                         "checkpointed_bytes": layers * sum(m.checkpointed_bytes for m in per.values())
                         + sum(m.saved_bytes for m in per.values())})
            rows[-1]["total_bytes"] = 4 * params + rows[-1]["saved_bytes"]
    return rows


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}" if n >= 2**28 else f"{n / 2**30:.3f}"


def table(result: dict) -> str:
    """Per model: the adapters' parameters + gradients + AdamW state, and the activations they
    save beyond the frozen layers', in GiB, at each batch."""
    lines = []
    tokens = result["tokens"]
    for model in dict.fromkeys(r["model"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["model"] == model]
        first = rows[0]
        lines += [f"**{model}** (q, k, v, o of {first['layers']} layers; bf16 activations; GiB)", "",
                  "| method | trainable params | params + grads + AdamW | " +
                  " | ".join(f"saved, {t:,} tokens" for t in tokens) + " |",
                  "|---|---|---|" + "---|" * len(tokens)]
        for name in dict.fromkeys(r["method"] for r in rows):
            by = {r["tokens"]: r for r in rows if r["method"] == name}
            r0 = by[tokens[0]]
            lines.append(f"| {name} | {r0['trainable']:,} | {_gib(4 * r0['param_bytes'])} | "
                         + " | ".join(_gib(by[t]["saved_bytes"]) for t in tokens) + " |")
        lines.append("")
        if all("checkpointed_bytes" in r for r in rows):
            lines += [f"With activation checkpointing ({model}): saved beyond the frozen layers, GiB (every "
                      "layer's checkpointed forward, plus one block's adapted layers rebuilt in the backward)", "",
                      "| method | " + " | ".join(f"{t:,} tokens" for t in tokens) + " |",
                      "|---|" + "---|" * len(tokens)]
            for name in dict.fromkeys(r["method"] for r in rows):
                by = {r["tokens"]: r for r in rows if r["method"] == name}
                lines.append(f"| {name} | " + " | ".join(_gib(by[t]["checkpointed_bytes"]) for t in tokens) + " |")
            lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="folder for memory.json (default benchmarks/results/latest)")
    parser.add_argument("--tiny", action="store_true", help="one tiny model shape and two batches (a smoke run)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of: {', '.join(METHODS)}")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    import peft

    models, tokens = (TINY_MODELS, (16, 64)) if args.tiny else (MODELS, TOKENS)
    start = time.time()
    rows = [row for model, shape in models.items() for row in model_rows(model, shape, names, tokens)]
    result = {"meta": {"what": "bytes per model, measured on meta tensors", "dtype": str(DTYPE).replace("torch.", ""),
                       "torch": torch.__version__, "peft": peft.__version__, "commit": commit_id()[0],
                       "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                       "wall_seconds": round(time.time() - start, 1), "tiny": args.tiny},
              "tokens": list(tokens), "rows": rows}
    print(table(result))
    from .run import LATEST

    out = args.out or LATEST
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "memory.json")
    with open(path, "w") as fh:
        json.dump(result, fh, indent=1)
    print("wrote", os.path.relpath(path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
