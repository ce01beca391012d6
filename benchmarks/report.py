"""Write the committed results into the docs: ``python -m benchmarks.report``.

``docs/benchmarks.md`` gets every table of every ``benchmarks/results/*.json`` between its
``results`` markers (the fine-tuning results between ``finetune``, the PyTorch path's
formulations between ``crossover``); the README gets a short training-step table between its
``bench`` markers. Numbers only ever come from those files; ``benchmarks/test_bench.py``
checks that the docs are current. This is the explicit step of ``make bench-publish``.

``python -m benchmarks.report --results DIR --out FILE`` (what ``make bench`` runs) writes the
same tables for the fresh results in ``DIR`` to ``FILE`` instead, and touches no tracked file.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys

from .run import RESULTS, peers_summary, tables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs", "benchmarks.md")
README = os.path.join(ROOT, "README.md")
SHORT = ("frozen nn.Linear", "qGOFT quasi", "GOFT givens", "paper dense qGOFT", "PEFT LoRA r=8",
         "PEFT LoRA r=16", "PEFT OFT b=32", "PEFT BOFT b=4 m=2")


#: File name prefixes of the result kinds, most specific first; a speed result
#: (benchmarks.run) has none of them.
KINDS = {"finetune-timing": "finetune-timing-", "finetune-ablation": "finetune-ablation-", "finetune": "finetune-",
         "crossover": "crossover-", "serving-small": "serving-small-", "serving": "serving-", "memory": "memory",
         "models-cpu": "models-cpu-"}


def load_results(kind: str = "speed", folder: str = RESULTS) -> list[tuple[str, dict]]:
    """Result files of ``folder`` (default: the committed ones): ``"speed"`` (benchmarks.run),
    ``"finetune"`` (benchmarks.finetune), ``"finetune-timing"`` (its ``--timing``),
    ``"crossover"`` (benchmarks.crossover), ``"serving"`` (benchmarks.serving),
    ``"serving-small"`` (its ``--size small``, what ``make bench`` runs), ``"memory"``
    (benchmarks.memory), ``"finetune-ablation"`` (benchmarks.finetune ``--ablation``) or
    ``"models-cpu"`` (benchmarks.models ``--device cpu``)."""
    out = []
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        name = os.path.basename(path)
        # the static model's predictions (sass-*.json) are no measurement: docs/tuning.md shows them
        found = next((k for k, prefix in KINDS.items() if name.startswith(prefix)), "speed")
        if name.startswith("sass-") or found != kind:
            continue
        with open(path) as fh:
            out.append((os.path.relpath(path, ROOT), json.load(fh)))
    return out


def docs_section(results) -> str:
    parts = []
    for path, result in results:
        parts.append(f"### {result['meta']['device']}\n\nFrom `{path}` ({result['meta']['date']}, "
                     f"{result['meta']['wall_seconds']} s).\n\n{tables(result)}\n")
    return "\n".join(parts) if parts else "No results yet.\n"


def finetune_section(results) -> str:
    from .finetune import table

    parts = [f"From `{path}` ({result['meta']['date']}, {result['meta']['wall_seconds']} s).\n\n{table(result)}\n"
             for path, result in results]
    return "\n".join(parts) if parts else "No results yet.\n"


def timing_section(results) -> str:
    from .finetune import timing_table

    parts = [f"From `{path}` ({result['meta']['date']}, {result['meta']['wall_seconds']} s).\n\n"
             f"{timing_table(result)}\n" for path, result in results]
    return "\n".join(parts) if parts else "No results yet.\n"


def crossover_section(results) -> str:
    from .crossover import table

    parts = [f"From `{path}` ({result['meta']['date']}, {result['meta']['wall_seconds']} s).\n\n{table(result)}\n"
             for path, result in results]
    return "\n".join(parts) if parts else "No results yet.\n"


def readme_table(results) -> str:
    lines = []
    for path, result in results:
        layer = [r for r in result["layer"] if r["correct"]]
        if not layer:
            continue
        d, k = max({(r["d"], r["k"]) for r in layer}, key=lambda s: s[0] * s[1])
        rows = {r["method"]: r for r in layer if (r["d"], r["k"]) == (d, k)}
        meta = result["meta"]
        lines += [f"{meta['device']} ({meta['dtype']}, qGOFT via {meta['qgoft_path']}), one training step of a "
                  f"{d} -> {k} layer on {rows['frozen nn.Linear']['tokens']} tokens, from `{path}`:", "",
                  "| method | trainable params | step / frozen nn.Linear |", "|---|---|---|"]
        for name in SHORT:
            if name in rows:
                r = rows[name]
                label = f"{name} ({r['note']})" if r["note"] else name
                lines.append(f"| {label} | {r['trainable']:,} | {r.get('train_vs_frozen', 1.0):.2f} |")
        lines.append("")
        lines += peers_summary(result.get("peers", []))
    return "\n".join(lines) if lines else "No results yet.\n"


def readme_finetune(results) -> str:
    """Test accuracy per method and task, one table per committed fine-tuning result."""
    lines = []
    for path, result in results:
        datasets = sorted({s["dataset"] for s in result["summary"]})
        # the trained head's parameters, counted by the head-only row, are left out
        heads = {s["dataset"]: s["trainable"] for s in result["summary"] if s["method"].startswith("head only")}
        rows: dict[str, dict] = {}
        for s in result["summary"]:
            rows.setdefault(s["method"], {})[s["dataset"]] = s
        setting = result["setting"]
        lines += [f"Setting `{setting['name']}` ({setting['train']} training examples per task, "
                  f"{setting['epochs']} epochs, {len(setting['seeds'])} seeds; {result['meta']['device']}), "
                  f"test accuracy (%), from `{path}`:", "",
                  "| method | trainable params besides the head | " + " | ".join(datasets) + " |",
                  "|---|---|" + "---|" * len(datasets)]
        for method, by_dataset in rows.items():
            accs = [f"{100 * by_dataset[d]['test_acc_mean']:.1f} ± {100 * by_dataset[d]['test_acc_std']:.1f}"
                    if d in by_dataset else "-" for d in datasets]
            params = max(s["trainable"] - heads.get(d, 0) for d, s in by_dataset.items())
            lines.append(f"| {method} | {params:,} | " + " | ".join(accs) + " |")
        lines.append("")
    return "\n".join(lines) if lines else "No results yet.\n"


def serving_section(results) -> str:
    from .serving import table
    parts = []
    for path, result in results:
        meta = result["meta"]
        parts.append(f"From `{path}` ({meta['device']}, {meta['date']}, commit {meta['commit']}, torch "
                     f"{meta['torch']}, peft {meta['peft']}, {meta['wall_seconds']} s"
                     f"{'' if meta.get('complete', True) else '; the run stopped before its end: these rows only'})."
                     f"\n\n{table(result)}")
    return "\n".join(parts) if parts else "No results yet.\n"


def memory_section(results) -> str:
    from .memory import table
    parts = []
    for path, result in results:
        meta = result["meta"]
        parts.append(f"From `{path}` (meta tensors, {meta['date']}, commit {meta['commit']}, torch {meta['torch']}, "
                     f"peft {meta['peft']}).\n\n{table(result)}")
    return "\n".join(parts) if parts else "No results yet.\n"


def ablation_section(results) -> str:
    from .finetune import ablation_table

    parts = [f"From `{path}` ({result['meta']['date']}, {result['meta']['wall_seconds']} s, "
             f"{result['meta'].get('jobs', 1)} runs at a time, the threads shared among them)."
             f"\n\n{ablation_table(result)}\n"
             for path, result in results]
    return "\n".join(parts) if parts else "No results yet.\n"


def models_cpu_section(results) -> str:
    from .models import cpu_table

    parts = [f"From `{path}` ({result['meta']['date']}, {result['meta']['wall_seconds']} s).\n\n"
             f"{cpu_table(result)}\n"
             for path, result in results]
    return "\n".join(parts) if parts else "No results yet.\n"


def _replace(text: str, marker: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- {marker}:start -->\n).*?(<!-- {marker}:end -->)", re.S)
    if not pattern.search(text):
        raise ValueError(f"markers <!-- {marker}:start/end --> not found")
    return pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)


def render() -> dict[str, str]:
    results = load_results()
    out = {}
    with open(DOCS) as fh:
        text = _replace(fh.read(), "results", docs_section(results))
        text = _replace(text, "finetune", finetune_section(load_results("finetune")))
        text = _replace(text, "finetune-timing", timing_section(load_results("finetune-timing")))
        text = _replace(text, "serving", serving_section(load_results("serving")))
        text = _replace(text, "memory", memory_section(load_results("memory")))
        text = _replace(text, "finetune-ablation", ablation_section(load_results("finetune-ablation")))
        text = _replace(text, "models-cpu", models_cpu_section(load_results("models-cpu")))
        out[DOCS] = _replace(text, "crossover", crossover_section(load_results("crossover")))
    with open(README) as fh:
        text = _replace(fh.read(), "bench", readme_table(results))
        text = _replace(text, "serving", serving_section(load_results("serving")))
        out[README] = _replace(text, "finetune", readme_finetune(load_results("finetune")))
    return out


def summary(folder: str) -> str:
    """The docs' tables for the results in ``folder``, as one Markdown page."""
    speed, finetune = load_results("speed", folder), load_results("finetune", folder)
    parts = [f"# Results in {os.path.relpath(folder, ROOT)}", "",
             "Fresh results of this machine, not committed: `make bench-publish` copies them to",
             "`benchmarks/results/` and writes them into README.md and docs/benchmarks.md.", "",
             "## Training step (README table)", "", readme_table(speed), "## All tables", "", docs_section(speed)]
    if finetune:
        parts += ["## Fine-tuning", "", finetune_section(finetune)]
    serving = load_results("serving-small", folder) + load_results("serving", folder)
    if serving:
        parts += ["## Serving many adapters in one batch", "", serving_section(serving)]
    return "\n".join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=None,
                        help="summarise this folder's results into --out instead of updating the docs")
    parser.add_argument("--out", default=None, help="with --results: the Markdown file to write (default: stdout)")
    args = parser.parse_args(argv)
    if args.results is not None:
        text = summary(args.results)
        if args.out is None:
            print(text)
        else:
            with open(args.out, "w") as fh:
                fh.write(text)
            print("wrote", os.path.relpath(args.out))
        return 0
    if args.out is not None:
        parser.error("--out needs --results (without it, the report updates README.md and docs/benchmarks.md)")
    for path, text in render().items():
        with open(path, "w") as fh:
            fh.write(text)
        print("updated", os.path.relpath(path, ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
