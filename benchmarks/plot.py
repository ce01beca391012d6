"""Regenerate the plots from results: ``python -m benchmarks.plot [--results DIR] [--out DIR]``.

Reads every ``*.json`` of a results folder written by :mod:`benchmarks.run` or
:mod:`benchmarks.finetune` (default: the committed ``benchmarks/results/``) and writes PNGs to
``benchmarks/plots/`` (ignored by git: the data is what is kept). ``make bench`` plots its fresh
results into ``benchmarks/results/latest/plots/``.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

from .run import RESULTS

PLOTS = os.path.join(os.path.dirname(RESULTS), "plots")


def plot_result(path: str, plots: str = PLOTS) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(path) as fh:
        result = json.load(fh)
    name = os.path.splitext(os.path.basename(path))[0]
    meta = result["meta"]
    title = f"{meta['device']} · {meta['dtype']} · commit {meta['commit']}"
    written = []

    kernel = [r for r in result["kernel"] if r["variant"] != "torch.clone" and r["correct"]]
    if kernel:
        rows_max = max(r["rows"] for r in kernel)
        fig, ax = plt.subplots(figsize=(7, 4))
        for variant in sorted({r["variant"] for r in kernel}):
            for pass_name, style in (("fwd", "-o"), ("bwd", "--s"), ("fwd+bwd", ":^")):
                pts = sorted((r["d"], r["vs_clone"]) for r in kernel
                             if r["variant"] == variant and r["pass"] == pass_name and r["rows"] == rows_max)
                if pts:
                    ax.plot(*zip(*pts), style, label=f"{variant} {pass_name}")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set(xscale="log", xlabel="d", ylabel="time / torch.clone", title=f"givens_rotate, {rows_max} rows\n{title}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(os.path.join(plots, f"{name}-kernel.png"))
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)

    layer = [r for r in result["layer"] if r["correct"] and "train_vs_frozen" in r]
    shapes = sorted({(r["d"], r["k"]) for r in layer})
    if layer:
        fig, axes = plt.subplots(1, len(shapes), figsize=(4 * len(shapes), 4.5), sharey=True, squeeze=False)
        for ax, (d, k) in zip(axes[0], shapes):
            sub = [r for r in layer if (r["d"], r["k"]) == (d, k)]
            ax.barh([r["method"] for r in sub], [r["train_vs_frozen"] for r in sub],
                    color=["C0" if r["family"] == "qgoft" else "C3" if r["family"] == "paper" else "C7" for r in sub])
            ax.axvline(1.0, color="grey", lw=0.8)
            ax.set(title=f"{d} -> {k}, {sub[0]['tokens']} tokens", xlabel="train step / frozen nn.Linear")
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        written.append(os.path.join(plots, f"{name}-layer.png"))
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


def plot_finetune(path: str, plots: str = PLOTS) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(path) as fh:
        result = json.load(fh)
    rows = result["summary"]
    datasets = sorted({r["dataset"] for r in rows})
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4.5), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        sub = [r for r in rows if r["dataset"] == dataset]
        ax.barh([f"{r['method']} ({r['trainable']:,})" for r in sub], [100 * r["test_acc_mean"] for r in sub],
                xerr=[100 * r["test_acc_std"] for r in sub],
                color=["C0" if "GOFT" in r["method"] else "C7" for r in sub])
        lo = min(100 * r["test_acc_mean"] for r in sub)
        ax.set(xlim=(max(0, lo - 10), 100), xlabel="test accuracy (%), mean ± std over seeds", title=dataset)
    meta = result["meta"]
    fig.suptitle(f"all-MiniLM-L6-v2, setting {result['setting']['name']} · {meta['device']} · commit {meta['commit']}",
                 fontsize=9)
    fig.tight_layout()
    out = os.path.join(plots, os.path.splitext(os.path.basename(path))[0] + ".png")
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return [out]


def plot_serving(path: str, plots: str = PLOTS) -> list[str]:
    """Tokens per second against the number of adapters, a line per method, a panel per workload."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .serving import METHODS, OURS

    with open(path) as fh:
        result = json.load(fh)
    workloads = list(dict.fromkeys(r["workload"] for r in result["rows"]))
    fig, axes = plt.subplots(1, len(workloads), figsize=(6 * len(workloads), 4.2), squeeze=False)
    for ax, workload in zip(axes[0], workloads):
        rows = [r for r in result["rows"] if r["workload"] == workload]
        for i, method in enumerate(METHODS):
            sub = [r for r in rows if r["method"] == method]
            ax.plot([r["adapters"] for r in sub], [r["tokens_per_s"] for r in sub], marker="o",
                    lw=2.2 if method == OURS else 1.2, color="C0" if method == OURS else f"C{i + 1}", label=method)
        unit = "input" if rows[0]["kind"] == "encoder" else "generated"
        ax.set(xscale="log", yscale="log", xlabel="adapters in the batch (N)", ylabel=f"{unit} tokens / s",
               title=f"{workload}, {rows[0]['requests']} requests")
        ax.grid(True, which="both", lw=0.3)
        ax.legend(fontsize=7)
    meta = result["meta"]
    fig.suptitle(f"Mixed-adapter batches · {meta['device']} · commit {meta['commit']}", fontsize=9)
    fig.tight_layout()
    out = os.path.join(plots, os.path.splitext(os.path.basename(path))[0] + ".png")
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return [out]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.plot", description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=RESULTS, help="folder of result files (default: the committed ones)")
    parser.add_argument("--out", default=PLOTS, help="folder for the PNGs (default: the ignored benchmarks/plots/)")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    # the crossover and epoch-timing results are tables only; the static model's are no measurement
    paths = sorted(p for p in glob.glob(os.path.join(args.results, "*.json"))
                   if not os.path.basename(p).startswith(("crossover-", "finetune-timing-", "sass-")))
    if not paths:
        print(f"no results in {args.results}; run python -m benchmarks.run first")
        return 0
    for path in paths:
        name = os.path.basename(path)
        plot = plot_finetune if name.startswith("finetune-") else plot_serving if name.startswith("serving") \
            else plot_result
        for out in plot(path, args.out):
            print("wrote", os.path.relpath(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
