"""Serving many fine-tunes of one base model in one batch: ``python -m benchmarks.serving``.

A batch of requests, each for one of ``N`` adapters (drawn at random, seeded), runs through a
BERT-sized encoder (a forward over every token) and a LLaMA-shaped decoder (``generate``:
greedy new tokens for every request), random weights from configs (no downloads). Per ``N``,
the methods are timed in the same interleaved rounds (``timing.interleaved_ms``):

- ``qGOFT mixed``: the PEFT route, ``model(**inputs, adapter_names=[...])`` (qGOFT quasi);
- ``LoRA r=8 mixed`` / ``LoRA r=16 mixed``: PEFT's LoRA with ``adapter_names``;
- ``OFT b=32 per adapter``: PEFT's OFT has no mixed batch: one call per adapter present,
  ``set_adapter`` between them;
- ``qGOFT merged, swapped``: what users of rotation adapters do today: per adapter present,
  ``W R^T`` written into the base's target layers, then that adapter's requests;
- ``base model``: no adapter, the floor.

Reported: tokens per second (encoder: every input token; decoder: generated tokens), the
ratios of qGOFT mixed to each peer from the paired rounds (a 95% interval), and the resident
memory per adapter (its parameters; for qGOFT also the stacks its layers keep while serving).
Before any timing, qGOFT's mixed batch is checked against each of a few requests run alone.
The goal on the CPU (docs/benchmarks.md, "Serving"): at every ``N``, qGOFT mixed at least
LoRA r=16 mixed and 0.9x LoRA r=8 mixed, and 3x OFT from ``N = 16``.

``--size small`` (what ``make bench`` runs) takes tiny models and ``N`` up to 16; the default
``full`` takes the sizes below and ``N`` in {1, 4, 16, 64, 256}.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from .methods import lora_config, oft_config, peft_version
from .provenance import commit_id
from .run import LATEST, device_name, slug
from .timing import interleaved_ms, paired_ratio, steady_allocator

OURS = "qGOFT mixed"
PEERS = ("LoRA r=8 mixed", "LoRA r=16 mixed", "OFT b=32 per adapter", "qGOFT merged, swapped")
BASE = "base model"
METHODS = (OURS, *PEERS, BASE)
#: the goal per peer: qGOFT mixed's tokens/s at least this multiple of the peer's, from this N on
GOAL = {"LoRA r=16 mixed": (1.0, 1), "LoRA r=8 mixed": (0.9, 1), "OFT b=32 per adapter": (3.0, 16)}


@dataclass(frozen=True)
class Workload:
    name: str
    kind: str           # "encoder" or "decoder"
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    requests: int
    tokens: int         # input tokens per request
    new_tokens: int = 0  # generated per request (decoder)
    kv_heads: int = 0

    @property
    def targets(self) -> list[str]:
        return ["query", "value"] if self.kind == "encoder" else ["q_proj", "v_proj"]


SIZES = {
    "full": {
        "adapters": (1, 4, 16, 64, 256),
        # sized for 2 CPU cores: one encoder forward is ~175 GFLOP, one generate ~150
        "workloads": (Workload("BERT-base encoder", "encoder", 768, 12, 12, 3072, 30522, 32, 32),
                      Workload("LLaMA-shaped decoder", "decoder", 1024, 8, 16, 2816, 32000, 16, 32, 8, 4)),
        "rounds": 5, "budget_s": 60.0,
    },
    "small": {
        "adapters": (1, 4, 16),
        "workloads": (Workload("tiny encoder", "encoder", 128, 2, 4, 512, 1000, 16, 16),
                      Workload("tiny decoder", "decoder", 128, 2, 4, 344, 1000, 8, 8, 4, 2)),
        "rounds": 3, "budget_s": 10.0,
    },
}


def base_model(w: Workload, seed: int = 0) -> nn.Module:
    import transformers

    torch.manual_seed(seed)
    if w.kind == "encoder":
        config = transformers.BertConfig(hidden_size=w.hidden, num_hidden_layers=w.layers,
                                         num_attention_heads=w.heads, intermediate_size=w.intermediate,
                                         vocab_size=w.vocab)
        return transformers.BertModel(config).eval()
    config = transformers.LlamaConfig(hidden_size=w.hidden, num_hidden_layers=w.layers, num_attention_heads=w.heads,
                                      num_key_value_heads=w.kv_heads, intermediate_size=w.intermediate,
                                      vocab_size=w.vocab, max_position_embeddings=w.tokens + w.new_tokens + 8,
                                      bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return transformers.LlamaForCausalLM(config).eval()


def _perturb(model: nn.Module, gen: torch.Generator, marks: tuple[str, ...]) -> None:
    """Random adapters (not the identity, not LoRA's zero B): small noise on their parameters."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(m in name for m in marks):
                p.add_(0.02 * torch.randn(p.shape, generator=gen).to(p.dtype))


def peft_model(w: Workload, method: str, names: list[str], gen: torch.Generator) -> nn.Module:
    """The base model with one adapter of ``method`` per name, each random."""
    import peft

    from qgoft_kernels.peft import QGOFTConfig

    def config():
        if method.startswith("qGOFT"):
            return QGOFTConfig(target_modules=w.targets, block="quasi", init_weights=False)
        if method.startswith("LoRA"):
            return lora_config(int(method.split("r=")[1].split()[0]), w.targets)
        return oft_config(32, w.targets)

    model = peft.get_peft_model(base_model(w), config(), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, config())
    _perturb(model, gen, ("qgoft_", "lora_A", "lora_B", "oft_"))
    return model.eval()


def adapter_bytes(model: nn.Module, name: str) -> int:
    """Bytes of adapter ``name``'s parameters in a PEFT model."""
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if f".{name}." in n + ".")


def serving_cache_bytes(model: nn.Module) -> int:
    """Bytes the qGOFT layers keep while serving mixed batches (stacked parameters and, on the
    CPU, their dense factors: ``qgoft_kernels.mixed.kept_bytes``)."""
    from qgoft_kernels.mixed import kept_bytes

    return sum(kept_bytes(m) for m in model.modules())


def _inputs(w: Workload, gen: torch.Generator) -> dict:
    ids = torch.randint(2, w.vocab, (w.requests, w.tokens), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _call(w: Workload, model: nn.Module, inputs: dict, **extra):
    if w.kind == "encoder":
        return model(**inputs, **extra).last_hidden_state
    return model.generate(**inputs, max_new_tokens=w.new_tokens, min_new_tokens=w.new_tokens, do_sample=False,
                          **extra)


def _select(inputs: dict, rows: list[int]) -> dict:
    return {k: v[rows] for k, v in inputs.items()}


def per_adapter(w: Workload, run_one, inputs: dict, names: list[str]):
    """Requests grouped by adapter, ``run_one(adapter, inputs)`` per group, outputs back in order."""
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        groups.setdefault(name, []).append(i)
    out = [None] * len(names)
    for name, rows in groups.items():
        result = run_one(name, _select(inputs, rows))
        for j, i in enumerate(rows):
            out[i] = result[j]
    return out


class MergedSwapped:
    """The base model; per adapter, its target layers' weights are replaced by ``W R^T`` (the
    merge of that qGOFT adapter, from the PEFT model's parameters), then its requests run."""

    def __init__(self, w: Workload, qgoft_model: nn.Module):
        import qgoft_kernels as qk

        self.w, self.qk = w, qk
        self.model = base_model(w)
        self.layers = {}   # name -> (linear, frozen W, {adapter: (rotation, scale, block)})
        for name, module in qgoft_model.base_model.model.named_modules():
            if hasattr(module, "qgoft_rotation"):
                linear = self.model.get_submodule(name)
                adapters = {a: (module.qgoft_rotation[a].detach(),
                                module.qgoft_scale[a].detach() if a in module.qgoft_scale else None,
                                module.qgoft_block[a]) for a in module.qgoft_rotation}
                self.layers[name] = (linear, linear.weight.detach().clone(), adapters)

    @torch.no_grad()
    def swap(self, adapter: str) -> None:
        for linear, weight, adapters in self.layers.values():
            rotation, scale, block = adapters[adapter]
            linear.weight.copy_(self.qk.givens_rotate(weight, rotation, block=block, scale=scale, transpose=True))

    def __call__(self, inputs: dict, names: list[str]):
        def one(adapter, sub):
            self.swap(adapter)
            return _call(self.w, self.model, sub)
        return per_adapter(self.w, one, inputs, names)


def build(w: Workload, n_adapters: int, seed: int = 0) -> dict:
    """Everything one ``N`` needs: the requests, their adapters, and a callable per method."""
    gen = torch.Generator().manual_seed(seed)
    names = [f"t{i}" for i in range(n_adapters)]
    draw = random.Random(seed)
    chosen = [names[draw.randrange(n_adapters)] for _ in range(w.requests)]
    inputs = _inputs(w, gen)
    models = {m: peft_model(w, m, names, gen) for m in (OURS, "LoRA r=8 mixed", "LoRA r=16 mixed",
                                                          "OFT b=32 per adapter")}
    merged = MergedSwapped(w, models[OURS])
    base = base_model(w)
    oft = models["OFT b=32 per adapter"]

    def oft_one(adapter, sub):
        oft.set_adapter(adapter)
        return _call(w, oft, sub)

    fns = {name: (lambda m=models[name]: _call(w, m, inputs, adapter_names=chosen))
           for name in (OURS, "LoRA r=8 mixed", "LoRA r=16 mixed")}
    fns["OFT b=32 per adapter"] = lambda: per_adapter(w, oft_one, inputs, chosen)
    fns["qGOFT merged, swapped"] = lambda: merged(inputs, chosen)
    fns[BASE] = lambda: _call(w, base, inputs)
    memory = {name: adapter_bytes(models[name], names[0]) for name in (OURS, "LoRA r=8 mixed", "LoRA r=16 mixed",
                                                                        "OFT b=32 per adapter")}
    memory["qGOFT merged, swapped"] = memory[OURS]
    return {"fns": fns, "inputs": inputs, "chosen": chosen, "models": models, "merged": merged, "memory": memory,
            "present": len(set(chosen))}


@torch.no_grad()
def check_mixed(w: Workload, setup: dict, requests: int = 3) -> float:
    """The largest relative error of qGOFT's mixed batch against requests run alone (adapter set
    active) and against the merged-and-swapped model; raises when one is off."""
    from qgoft_kernels.verify import assert_close, rel_error

    model, chosen, inputs = setup["models"][OURS], setup["chosen"], setup["inputs"]
    if w.kind == "decoder":
        # the logits of the prompts (generation would only repeat the comparison)
        mixed = model(**inputs, adapter_names=chosen).logits
    else:
        mixed = _call(w, model, inputs, adapter_names=chosen)
    worst = 0.0
    for i in range(min(requests, len(chosen))):
        model.set_adapter(chosen[i])
        sub = _select(inputs, [i])
        alone = model(**sub).logits if w.kind == "decoder" else _call(w, model, sub)
        assert_close(mixed[i:i + 1], alone, name=f"{w.name}, request {i} ({chosen[i]}) mixed vs alone")
        setup["merged"].swap(chosen[i])
        merged = setup["merged"].model(**sub)
        merged = merged.logits if w.kind == "decoder" else merged.last_hidden_state
        assert_close(merged, alone, name=f"{w.name}, request {i} ({chosen[i]}) merged vs adapted")
        worst = max(worst, rel_error(mixed[i:i + 1], alone))
    return worst


def measure(w: Workload, n_adapters: int, rounds: int, budget_s: float, seed: int = 0) -> dict:
    start = time.time()
    setup = build(w, n_adapters, seed)
    built = time.time() - start
    error = check_mixed(w, setup)
    with torch.no_grad():
        timed = interleaved_ms(setup["fns"], rounds=rounds, budget_s=budget_s, sample_s=0.0, min_rounds=min(3, rounds))
    tokens = w.requests * (w.tokens if w.kind == "encoder" else w.new_tokens)
    times = timed["times"]
    rows = []
    for method in METHODS:
        t = times[method]
        row = {"workload": w.name, "kind": w.kind, "adapters": n_adapters, "present": setup["present"],
               "requests": w.requests, "tokens": tokens, "method": method, "ms": t["median"], "q20": t["q20"],
               "q80": t["q80"], "rounds": len(t["samples"]), "tokens_per_s": tokens / (t["median"] / 1e3),
               "adapter_bytes": setup["memory"].get(method)}
        if method == OURS:
            row["serving_cache_bytes_per_adapter"] = serving_cache_bytes(setup["models"][OURS]) / n_adapters
            row["max_rel_error_vs_alone"] = error
        if method in PEERS:
            # the peer's time over ours: above 1, qGOFT mixed is faster
            row["speedup"] = paired_ratio(t["samples"], times[OURS]["samples"])
        rows.append(row)
    return {"rows": rows, "load": timed["load"], "others_busy": timed["others_busy"], "build_seconds": round(built, 1)}


def verdict(rows: list[dict], peer: str) -> str:
    """Whether qGOFT mixed meets its goal against ``peer`` at this ``N``: ``yes``, ``no``, or
    ``noise`` (the medians miss but the 95% interval of the paired ratio reaches the goal)."""
    factor, from_n = GOAL[peer]
    row = next(r for r in rows if r["method"] == peer)
    if row["adapters"] < from_n:
        return "-"
    s = row["speedup"]
    if s["median"] >= factor:
        return "yes"
    return "noise" if s["hi"] >= factor else "no"


def table(result: dict) -> str:
    lines = []
    for workload in dict.fromkeys(r["workload"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["workload"] == workload]
        first = rows[0]
        unit = "input tokens" if first["kind"] == "encoder" else "generated tokens"
        lines += [f"**{workload}** ({first['requests']} requests; tokens/s counts {unit}; speedup: the peer's time "
                  f"over qGOFT mixed's, median of paired rounds [95% interval])", "",
                  "| adapters (present) | " + " | ".join(METHODS) + " | qGOFT vs LoRA r=16 | vs LoRA r=8 | vs OFT |"
                  " goal met |",
                  "|---|" + "---|" * (len(METHODS) + 4)]
        for n in dict.fromkeys(r["adapters"] for r in rows):
            sub = [r for r in rows if r["adapters"] == n]
            by = {r["method"]: r for r in sub}
            cells = [f"{by[m]['tokens_per_s']:,.0f}" for m in METHODS]
            ratios = []
            for peer in ("LoRA r=16 mixed", "LoRA r=8 mixed", "OFT b=32 per adapter"):
                s = by[peer]["speedup"]
                ratios.append(f"{s['median']:.2f} [{s['lo']:.2f}, {s['hi']:.2f}]")
            verdicts = [verdict(sub, p) for p in GOAL]
            met = "yes" if all(v in ("yes", "-") for v in verdicts) else ", ".join(
                f"{p}: {v}" for p, v in zip(GOAL, verdicts) if v not in ("yes", "-"))
            lines.append(f"| {n} ({sub[0]['present']}) | " + " | ".join(cells) + " | " + " | ".join(ratios)
                         + f" | {met} |")
        lines.append("")
        mem = {r["method"]: r for r in rows if r["adapters"] == rows[-1]["adapters"]}
        ours = mem[OURS]
        lines.append("Resident memory per adapter (parameters, float32): " + ", ".join(
            f"{m} {mem[m]['adapter_bytes'] / 1024:,.0f} KiB" for m in (OURS, "LoRA r=8 mixed", "LoRA r=16 mixed",
                                                                       "OFT b=32 per adapter"))
            + f"; while serving, qGOFT's layers also keep its parameters stacked and their dense factors: "
              f"{ours['serving_cache_bytes_per_adapter'] / 1024:,.0f} KiB per adapter.")
        lines.append("")
    return "\n".join(lines)


def metadata(size: str) -> dict:
    import peft
    import transformers

    import qgoft_kernels as qk

    device = torch.device("cpu")
    return {"device": device_name(device), "device_type": "cpu", "torch": torch.__version__, "peft": peft_version()
            or peft.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "qgoft_kernels": qk.__version__, "commit": commit_id()[0], "size": size,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "dtype": "float32", "timer": "benchmarks.timing.interleaved_ms (time.perf_counter, one call per sample)"}


def _write(path: str, result: dict) -> None:
    with open(path + ".tmp", "w") as fh:
        json.dump(result, fh, indent=1)
    os.replace(path + ".tmp", path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serving", description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--adapters", type=int, nargs="+", default=None, help="the N to run (default: the size's)")
    parser.add_argument("--workloads", nargs="+", choices=["encoder", "decoder"], default=["encoder", "decoder"])
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--budget", type=float, default=None, help="seconds of timing rounds per N at most")
    parser.add_argument("--out", default=None, help=f"folder for the result (default {os.path.relpath(LATEST)})")
    args = parser.parse_args(argv)
    if torch.cuda.is_available():
        print("benchmarks.serving times the CPU path; the GPU version runs in make gpu-quick", flush=True)
    size = SIZES[args.size]
    steady_allocator()
    result = {"meta": metadata(args.size), "goal": {k: list(v) for k, v in GOAL.items()}, "rows": [], "runs": []}
    folder = args.out or LATEST
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"serving{'-small' if args.size == 'small' else ''}-{slug(torch.device('cpu'))}.json")
    start = time.time()
    for w in size["workloads"]:
        if w.kind not in args.workloads:
            continue
        result["workloads"] = result.get("workloads", []) + [asdict(w)]
        for n in args.adapters or size["adapters"]:
            print(f"{w.name}, {n} adapter(s) ...", flush=True)
            out = measure(w, n, args.rounds or size["rounds"], args.budget or size["budget_s"])
            result["rows"] += out["rows"]
            result["runs"].append({"workload": w.name, "adapters": n, "load": out["load"],
                                   "others_busy": out["others_busy"], "build_seconds": out["build_seconds"]})
            # written after every N, so that a long run stopped part-way keeps what it measured
            result["meta"]["wall_seconds"] = round(time.time() - start, 1)
            result["meta"]["complete"] = False
            _write(path, result)
    result["meta"]["complete"] = True
    _write(path, result)
    print(table(result))
    print("wrote", os.path.relpath(path), f"({result['meta']['wall_seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
