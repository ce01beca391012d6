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
        from matplotlib.patches import Patch

        fig, axes = plt.subplots(1, len(shapes), figsize=(4 * len(shapes), 4.8), sharey=True, squeeze=False)
        for ax, (d, k) in zip(axes[0], shapes):
            sub = [r for r in layer if (r["d"], r["k"]) == (d, k)]
            ax.barh([r["method"] for r in sub], [r["train_vs_frozen"] for r in sub],
                    color=[FAMILY_COLOURS.get(r["family"], "C7") for r in sub])
            ax.axvline(1.0, color="grey", lw=0.8)
            ax.set(title=f"{d} -> {k}, {sub[0]['tokens']} tokens", xlabel="train step / frozen nn.Linear")
        families = dict.fromkeys(r["family"] for r in layer)
        fig.legend(handles=[Patch(color=FAMILY_COLOURS.get(f, "C7"), label=FAMILY_NAMES.get(f, f)) for f in families],
                   loc="lower center", ncol=len(families), fontsize=8, frameon=False)
        fig.suptitle(f"{title}\nbars: one training step (forward + backward incl. dx) over the frozen layer's; "
                     f"grey line: the frozen layer", fontsize=9)
        fig.tight_layout(rect=(0, 0.06, 1, 1))
        written.append(os.path.join(plots, f"{name}-layer.png"))
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    if any(r["correct"] and "train_vs_lora" in r for r in result.get("peers", [])):
        written.append(plot_peers(result, os.path.join(plots, f"{name}-peers.png")))
    return written


#: Bar colours by method family (the peers table's and the layer table's ``family``), and their legend.
FAMILY_COLOURS = {"qgoft": "C0", "paper": "C3", "peft": "C7", "floor": "C2", "sweeps": "C1"}
FAMILY_NAMES = {"qgoft": "qgoft_kernels (GOFT / qGOFT)", "paper": "the paper's dense method", "peft": "PEFT peers",
                "floor": "frozen layer", "sweeps": "ours before the dense formulation"}


def plot_peers(result: dict, out: str) -> str:
    """The peers table as a chart: each method's training step and inference forward over LoRA
    r=8's at every shape, from the same interleaved rounds, a line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FormatStrFormatter, NullFormatter

    peers = [r for r in result["peers"] if r["correct"]]
    shapes = list(dict.fromkeys((r["d"], r["k"]) for r in peers))
    methods = list(dict.fromkeys(r["method"] for r in peers))
    by = {(r["d"], r["k"], r["method"]): r for r in peers}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
    styles = ["-o", "-s", "-^", "-D", "-v", "--o", "--s", "--^", ":o", ":s"]
    for ax, (kind, what) in zip(axes, (("train", "training step (forward + backward incl. dx)"),
                                       ("infer", "inference forward (unmerged)"))):
        for i, method in enumerate(methods):
            points = [(j, by[(d, k, method)].get(f"{kind}_vs_lora")) for j, (d, k) in enumerate(shapes)
                      if (d, k, method) in by]
            points = [(j, v) for j, v in points if v is not None]
            if not points:
                continue
            family = by[(shapes[points[0][0]][0], shapes[points[0][0]][1], method)]["family"]
            ax.plot(*zip(*points), styles[i % len(styles)], color=f"C{i % 10}", label=method,
                    lw=2.0 if family == "qgoft" else 1.0, ms=4)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xticks(range(len(shapes)), [f"{d}->{k}" for d, k in shapes], rotation=45, ha="right", fontsize=7)
        ax.set(yscale="log", xlabel="layer d -> k", ylabel="time / PEFT LoRA r=8's (same rounds)", title=what)
        ax.yaxis.set_major_locator(FixedLocator([0.25, 0.35, 0.5, 0.7, 0.85, 1.0, 1.2, 1.5, 2, 3, 4, 6, 8]))
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, which="both", lw=0.3)
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    meta = result["meta"]
    fig.suptitle(f"Peers on the CPU, {result['peers'][0]['tokens']} tokens, {meta['dtype']} · {meta['device']} · "
                 f"commit {meta['commit']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _panels(path: str, key: str, width: float, height: float):
    """The result in ``path`` and a figure with a panel per distinct ``row[key]``: ``(result, fig,
    [(axis, value), ...])``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(path) as fh:
        result = json.load(fh)
    names = list(dict.fromkeys(r[key] for r in result["rows"]))
    fig, axes = plt.subplots(1, len(names), figsize=(width * len(names), height), squeeze=False)
    return result, fig, list(zip(axes[0], names))


def _save(fig, plots: str, path: str) -> list[str]:
    """Lay ``fig`` out and write it as ``plots/<path's name>.png``; returns ``[that file]``."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out = os.path.join(plots, os.path.splitext(os.path.basename(path))[0] + ".png")
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return [out]


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
    from matplotlib.patches import Patch

    axes[0][-1].legend(handles=[Patch(color="C0", label="GOFT / qGOFT (this package)"),
                                Patch(color="C7", label="peers and baselines")], fontsize=8, loc="lower right")
    meta = result["meta"]
    fig.suptitle(f"all-MiniLM-L6-v2, setting {result['setting']['name']} · {meta['device']} · commit {meta['commit']}",
                 fontsize=9)
    return _save(fig, plots, path)


def plot_serving(path: str, plots: str = PLOTS) -> list[str]:
    """Tokens per second against the number of adapters, a line per method, a panel per workload."""
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    from .serving import METHODS, OURS

    result, fig, panels = _panels(path, "workload", 6, 4.2)
    for ax, workload in panels:
        rows = [r for r in result["rows"] if r["workload"] == workload]
        for i, method in enumerate(METHODS):
            sub = [r for r in rows if r["method"] == method]
            ax.plot([r["adapters"] for r in sub], [r["tokens_per_s"] for r in sub], marker="o",
                    lw=2.2 if method == OURS else 1.2, color="C0" if method == OURS else f"C{i + 1}", label=method)
        unit = "input" if rows[0]["kind"] == "encoder" else "generated"
        ax.set(xscale="log", yscale="log", xlabel="adapters in the batch (N)", ylabel=f"{unit} tokens / s",
               title=f"{workload}, {rows[0]['requests']} requests")
        ax.set_xticks(sorted({r["adapters"] for r in rows}))
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(FormatStrFormatter("%g"))
            axis.set_minor_formatter(FormatStrFormatter("%g") if axis is ax.yaxis else NullFormatter())
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.grid(True, which="both", lw=0.3)
        ax.legend(fontsize=7)
    meta = result["meta"]
    fig.suptitle(f"Mixed-adapter batches · {meta['device']} · commit {meta['commit']}", fontsize=9)
    return _save(fig, plots, path)


def plot_memory(path: str, plots: str = PLOTS) -> list[str]:
    """Activations saved beyond the frozen layers against the batch, a line per method, a panel per model."""
    from matplotlib import colormaps

    result, fig, panels = _panels(path, "model", 5.5, 4.4)
    for ax, model in panels:
        rows = [r for r in result["rows"] if r["model"] == model]
        for i, method in enumerate(dict.fromkeys(r["method"] for r in rows)):
            sub = [r for r in rows if r["method"] == method]
            ours = not method.startswith("PEFT")
            ax.plot([r["tokens"] for r in sub], [r["saved_bytes"] / 2**30 for r in sub], marker="o", ms=3,
                    ls="-" if "GPU" in method or not ours else "--", lw=1.8 if ours else 1.0,
                    color=colormaps["tab20"](i % 20),
                    label=method)
        ax.set(xscale="log", yscale="log", xlabel="tokens in the batch", title=f"{model}, q k v o adapted",
               ylabel="activations saved beyond the frozen layers (GiB)")
        ax.grid(True, which="both", lw=0.3)
    panels[-1][0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    meta = result["meta"]
    fig.suptitle(f"Training memory on meta tensors (bf16 activations) · commit {meta['commit']}", fontsize=9)
    return _save(fig, plots, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.plot", description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=RESULTS, help="folder of result files (default: the committed ones)")
    parser.add_argument("--out", default=PLOTS, help="folder for the PNGs (default: the ignored benchmarks/plots/)")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    # the crossover, epoch-timing and CPU step-time results are tables only; the static model's
    # are no measurement
    paths = sorted(p for p in glob.glob(os.path.join(args.results, "*.json"))
                   if not os.path.basename(p).startswith(("crossover-", "finetune-timing-", "sass-", "models-cpu-")))
    if not paths:
        print(f"no results in {args.results}; run python -m benchmarks.run first")
        return 0
    for path in paths:
        name = os.path.basename(path)
        plot = plot_finetune if name.startswith("finetune-") else plot_serving if name.startswith("serving") \
            else plot_memory if name.startswith("memory") else plot_result
        for out in plot(path, args.out):
            print("wrote", os.path.relpath(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
