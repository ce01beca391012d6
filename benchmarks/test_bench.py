"""``pytest benchmarks/``: a short version of the benchmarks (pytest-benchmark), plus checks.

Times one training step of each method on a small layer with pytest-benchmark, checks the
paper's dense method against ``givens_matrix``, and runs the CLI end to end on tiny shapes.
"""
import pytest
import torch

import qgoft_kernels as qk
from benchmarks import run
from benchmarks.methods import make_linear, methods, peft_version, trainable_parameters
from benchmarks.paper_dense import PaperDenseGivensLinear
from qgoft_kernels.verify import assert_close

#: the training step timed by pytest-benchmark: a BERT-base-sized layer (at d = 64 a step is
#: mostly per-call overhead, which says little about a real model)
D, K, TOKENS = 768, 768, 512
METHODS = methods(D, K, peft_version() is not None)


@pytest.mark.parametrize("scale", [False, True])
@pytest.mark.parametrize("block", ["givens", "quasi"])
def test_paper_dense_method_computes_the_same_layer(block, scale):
    base = make_linear(24, 8, "cpu", torch.float32)
    paper = PaperDenseGivensLinear.from_linear(base, block=block, scale=scale)
    ours = qk.GivensLinear.from_linear(base, block=block, scale=scale)
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    paper.load_state_dict(ours.state_dict())
    R = qk.givens_matrix(24, ours.rotation.double(), block=block,
                         scale=None if ours.scale is None else ours.scale.double())
    assert_close(paper.dense_rotation(), R, rtol=1e-6)
    x = torch.randn(5, 24, requires_grad=True)
    assert_close(paper(x), ours(x), rtol=1e-6)
    paper(x).sum().backward()
    assert paper.rotation.grad is not None and x.grad is not None


def test_lora_budget_rank():
    from benchmarks.methods import lora_rank_for_budget

    # 4 (d - 1) qGOFT parameters: r (d + k) nearest
    assert lora_rank_for_budget(768, 768) == 2
    assert lora_rank_for_budget(4096, 16384) == 1


@pytest.mark.parametrize("method", METHODS, ids=[m.name for m in METHODS])
def test_train_step(benchmark, method):
    base = make_linear(D, K, "cpu", torch.float32)
    module, _ = method.build(base)
    x = torch.randn(TOKENS, D, requires_grad=True)
    dy = torch.randn(TOKENS, K)
    benchmark.extra_info["trainable"] = trainable_parameters(module)
    benchmark(lambda: torch.autograd.backward(module(x), dy))
    assert torch.isfinite(x.grad).all()
    assert (trainable_parameters(module) == 0) == (method.family == "floor")


def test_cli_quick(capsys):
    assert run.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "| 64 -> 64 |" in out and "Merge" in out and "FAILED" not in out
    # the peers table: every variant of ours, the sweeps as the before, OFT and LoRA
    assert "Peers on the CPU" in out
    for name in ("qGOFT quasi+scale", "GOFT givens (sweeps)", "PEFT OFT b=32", "PEFT LoRA r=8"):
        assert f"| 64 -> 64 | {name} |" in out, name
    # the adapters' own work: at 64 -> 256 on 128 tokens ours rotates x, at 64 -> 64 its weight
    own = out.split("The adapters' own work")[1].split("Merge")[0]
    for name in ("qGOFT quasi", "GOFT givens+scale", "PEFT OFT b=32", "PEFT LoRA r=8"):
        assert f"| 64 -> 256 | {name} |" in own, name
    assert "| 64 -> 64 |" not in own and "(sweeps)" not in own and "| frozen nn.Linear |" not in own


@pytest.mark.skipif(peft_version() is None, reason="PEFT is not installed")
def test_own_work_is_the_layer_without_its_frozen_product():
    """What the own-work table times, then the frozen layer, is the method's layer."""
    from benchmarks.methods import own_work

    base = make_linear(D, 4 * K, "cpu", torch.float32)
    x = torch.randn(TOKENS, D)
    frozen_out = base(x)
    found = set()
    for method in METHODS:
        module, _ = method.build(base)
        run.perturb(module)
        work = own_work(module, frozen_out)
        if work is None:
            assert method.family in ("floor", "paper") or "BOFT" in method.name, method.name
            continue
        found.add(method.family)
        with torch.no_grad():
            out = work(x)
            whole = out if out.shape == frozen_out.shape else base(out)
            assert_close(whole, module(x), rtol=1e-5, name=method.name)
    assert found == {"qgoft", "peft"}


def test_crossover_quick(capsys):
    from benchmarks import crossover

    assert crossover.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "rule picks" in out and "FAILED" not in out
    # every (d, rows) point of the quick grid, both passes
    assert out.count("| train |") == out.count("| infer |") == 4


def test_docs_show_the_committed_results():
    """README and docs/benchmarks.md carry exactly what benchmarks/results/ holds."""
    from benchmarks import report

    for path, text in report.render().items():
        with open(path) as fh:
            assert fh.read() == text, f"{path} is stale: run python -m benchmarks.report"


def test_paired_ratio_is_the_median_ratio_with_its_order_statistic_interval():
    from benchmarks.timing import paired_ratio

    against = [2.0] * 15
    times = [2.0 * r for r in (9, 3, 15, 1, 7, 12, 5, 2, 14, 8, 4, 11, 6, 13, 10)]
    p = paired_ratio(times, against)
    # 15 rounds: the 4th smallest and the 4th largest ratio bound the median at 95% or more
    assert p == {"median": 8.0, "lo": 4.0, "hi": 12.0, "rounds": 15, "level": 0.95}
    # rounds are paired: a load that doubles both samples of a round leaves its ratio alone
    load = [1 + i % 2 for i in range(15)]
    assert paired_ratio([t * f for t, f in zip(times, load)], [a * f for a, f in zip(against, load)]) == p
    # too few rounds for a 95% interval: the range, and no level
    assert paired_ratio([1.0, 3.0, 2.0], [1.0, 1.0, 1.0]) == {"median": 2.0, "lo": 1.0, "hi": 3.0, "rounds": 3,
                                                              "level": None}
    assert paired_ratio([], []) is None


def test_interleaved_rounds_past_the_budget():
    from benchmarks.timing import interleaved_ms

    calls = []
    timed = interleaved_ms({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=10,
                           budget_s=0.0, sample_s=0.0, min_rounds=6)
    # the budget is spent at once: the minimum of rounds runs, every function once per round
    assert [len(t["samples"]) for t in timed["times"].values()] == [6, 6]
    assert calls.count("a") == calls.count("b") == 2 + 6


def test_goal_verdict():
    def row(vs_oft, vs_lora, oft_lo=None, lora_lo=None, level=0.95):
        r = {"train_vs_oft": vs_oft, "train_vs_lora": vs_lora}
        if oft_lo is not None:
            r["train_vs_oft_paired"] = {"median": vs_oft, "lo": oft_lo, "hi": 2.0, "rounds": 15, "level": level}
            r["train_vs_lora_paired"] = {"median": vs_lora, "lo": lora_lo, "hi": 2.0, "rounds": 15, "level": level}
        return r

    assert run.goal_verdict(row(0.99, 1.1), "train") == "yes"
    assert run.goal_verdict(row(1.03, 1.1, 0.97, 1.0), "train") == "noise"
    assert run.goal_verdict(row(1.03, 1.1, 1.01, 1.0), "train") == "NO"  # measurably slower than OFT
    assert run.goal_verdict(row(0.95, 1.3, 0.9, 1.21), "train") == "NO"  # measurably past 1.2x LoRA
    assert run.goal_verdict(row(1.03, 1.1, 0.97, 1.0, level=None), "train") == "missed"  # too few rounds
    assert run.goal_verdict(row(1.03, 1.1), "train") == "missed"  # no rounds recorded

    def own(r, hi, level=0.95):
        return {**r, "own_train_vs_oft_paired": {"median": hi - 0.1, "lo": hi - 0.2, "hi": hi, "rounds": 15,
                                                 "level": level}}

    # a tie within the spread, and the adapter's own work measurably below OFT's: met by it
    assert run.goal_verdict(own(row(1.03, 1.1, 0.97, 1.0), 0.8), "train") == run.BY_OWN_WORK
    assert run.goal_verdict(own(row(1.03, 1.1, 0.97, 1.0), 1.02), "train") == "noise"  # own work not below
    assert run.goal_verdict(own(row(1.03, 1.1, 0.97, 1.0), 0.8, None), "train") == "noise"  # too few rounds
    assert run.goal_verdict(own(row(1.03, 1.1, 1.01, 1.0), 0.8), "train") == "NO"  # measurably slower stays so
    assert run.goal_verdict(own(row(1.03, 1.25, 0.97, 1.1), 0.8), "train") == "noise"  # LoRA's bound by medians
    assert run.goal_verdict(own(row(0.99, 1.1), 1.5), "train") == "yes"  # the medians alone decide first


def test_joined_rounds_keep_the_rounds_paired():
    from benchmarks.timing import joined_rounds, paired_ratio

    def session(a, b, load, busy):
        return {"times": {"a": {"median": 0.0, "q20": 0.0, "q80": 0.0, "runs": 2 * len(a), "samples": a},
                          "b": {"median": 0.0, "q20": 0.0, "q80": 0.0, "runs": len(b), "samples": b}},
                "load": load, "others_busy": busy}

    first = session([1.0, 4.0, 2.0], [1.0, 2.0, 1.0], [1.0, 1.5], 0.5)
    second = session([6.0, 3.0], [3.0, 3.0], [1.5, 2.5], None)
    joined = joined_rounds(first, second)
    assert joined["times"]["a"]["samples"] == [1.0, 4.0, 2.0, 6.0, 3.0]
    assert joined["times"]["a"]["median"] == 3.0 and joined["times"]["b"]["median"] == 2.0
    assert joined["times"]["a"]["runs"] == 10 and joined["times"]["b"]["runs"] == 5
    assert joined["load"] == [1.0, 2.5] and joined["others_busy"] is None
    assert paired_ratio(joined["times"]["a"]["samples"], joined["times"]["b"]["samples"])["median"] == 2.0
    assert joined_rounds(first, session([1.0], [1.0], [0.0, 0.0], 1.5))["others_busy"] == 1.0


@pytest.mark.skipif(peft_version() is None, reason="PEFT is not installed")
@pytest.mark.parametrize("first, passes", [([0.9] * 8, 1), ([1.03, 0.97, 1.03, 0.97, 1.03, 1.03, 0.97, 1.03], 2)])
def test_a_second_pass_only_for_a_shape_left_within_the_spread(monkeypatch, first, passes):
    """Scripted rounds: OFT, LoRA and the rest take 1 ms a round, ours ``first`` in the first
    pass (all faster, or a tie that the medians miss) and 0.9 ms in a second."""
    import statistics
    from dataclasses import replace

    seeds = []

    def rounds(fns, rounds, budget_s, min_rounds, seed):
        seeds.append(seed)
        ours = first if seed == 0 else [0.9] * 8
        samples = {name: ours if name.split("|")[0] in run.PEER_METHODS[1:5] else [1.0] * 8 for name in fns}
        times = {name: {"median": statistics.median(s), "q20": min(s), "q80": max(s), "runs": 8, "samples": s}
                 for name, s in samples.items()}
        return {"times": times, "load": [0.0, 0.0], "others_busy": 0.0}

    monkeypatch.setattr(run, "interleaved_ms", rounds)
    rows = run.peer_rows(torch.device("cpu"), replace(run.QUICK_PLAN, peer_shapes=((64, 64),)))
    assert seeds == list(range(passes))
    ours = [r for r in rows if run.held_to_goal(r)]
    assert len(ours) == 4 and all(r["passes"] == passes for r in rows)
    assert all(r["train_vs_oft_paired"]["rounds"] == 8 * passes for r in ours)
    # one pass: all met; two: the second pass's faster rounds bring the medians below OFT's
    assert all(run.goal_verdict(r, kind) == "yes" for r in ours for kind in ("train", "infer"))
    assert run.rounds_cell(ours[0]) == ("8" if passes == 1 else "16 (2 passes)")


def test_steady_allocator():
    import platform

    from benchmarks.timing import steady_allocator

    values = steady_allocator()
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert values == {"M_MMAP_THRESHOLD": 32 << 20, "M_TRIM_THRESHOLD": 2 ** 31 - 1}
    else:
        assert values is None or set(values) == {"M_MMAP_THRESHOLD", "M_TRIM_THRESHOLD"}


def test_device_name_names_the_cpu(monkeypatch, tmp_path):
    import builtins

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Example  CPU 9000\nflags\t\t: fpu\n")
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: real_open(cpuinfo if f == "/proc/cpuinfo" else f, *a, **k))
    assert run.cpu_model() == "Example CPU 9000"
    name = run.device_name(torch.device("cpu"))
    assert "(Example CPU 9000)" in name and name.endswith(f", {torch.get_num_threads()} threads")
    cpuinfo.unlink()  # no /proc/cpuinfo: no model in the name
    assert run.cpu_model() is None and "(" not in run.device_name(torch.device("cpu"))


@pytest.mark.skipif(peft_version() is None, reason="PEFT is not installed")
def test_serving_small(tmp_path, capsys):
    """The serving benchmark end to end at its small size: every method timed, qGOFT's mixed
    batch checked against requests alone (it raises otherwise), the table and the JSON."""
    import json

    from benchmarks import serving

    assert serving.main(["--size", "small", "--adapters", "1", "3", "--rounds", "2", "--budget", "1",
                         "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "**tiny encoder**" in out and "**tiny decoder**" in out
    (path,) = tmp_path.glob("serving-small-*.json")
    result = json.loads(path.read_text())
    assert result["meta"]["complete"] and not list(tmp_path.glob("*.tmp"))
    rows = result["rows"]
    assert {r["method"] for r in rows} == set(serving.METHODS)
    assert len(rows) == 2 * 2 * len(serving.METHODS)
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["rounds"] >= 2
        if r["method"] in serving.PEERS:
            assert r["speedup"]["lo"] <= r["speedup"]["median"] <= r["speedup"]["hi"]
    ours = [r for r in rows if r["method"] == serving.OURS]
    assert all(r["max_rel_error_vs_alone"] <= 1e-5 and r["serving_cache_bytes_per_adapter"] > 0 for r in ours)
    # qGOFT's parameters per adapter: 4 (d - 1) float32 per adapted layer (query, value; 2 layers of d = 128)
    assert ours[0]["adapter_bytes"] == 2 * 2 * 4 * 127 * 4


def test_serving_partial_run_is_written_and_marked(tmp_path, monkeypatch):
    """A run stopped after its first N keeps that N's rows, and the report says they are a part."""
    import json

    from benchmarks import report, serving

    calls = []

    def measure(w, n, rounds, budget_s):
        if calls:
            raise KeyboardInterrupt
        calls.append(n)
        return {"rows": [{"workload": w.name, "adapters": n, "method": serving.OURS}], "load": 0.0,
                "others_busy": 0.0, "build_seconds": 0.0}

    monkeypatch.setattr(serving, "measure", measure)
    with pytest.raises(KeyboardInterrupt):
        serving.main(["--size", "small", "--adapters", "1", "3", "--out", str(tmp_path)])
    (path,) = tmp_path.glob("serving-small-*.json")
    result = json.loads(path.read_text())
    assert result["meta"]["complete"] is False and [r["adapters"] for r in result["rows"]] == [1]
    monkeypatch.setattr(serving, "table", lambda result: "TABLE")
    assert "stopped before its end" in report.serving_section([(path.name, result)])
    result["meta"]["complete"] = True
    assert "stopped before its end" not in report.serving_section([(path.name, result)])


def test_serving_verdicts():
    from benchmarks.serving import verdict

    def rows(n, median, lo, hi, peer="LoRA r=16 mixed"):
        return [{"method": peer, "adapters": n, "speedup": {"median": median, "lo": lo, "hi": hi}}]

    assert verdict(rows(4, 1.1, 1.0, 1.2), "LoRA r=16 mixed") == "yes"
    assert verdict(rows(4, 0.95, 0.9, 1.02), "LoRA r=16 mixed") == "noise"
    assert verdict(rows(4, 0.95, 0.9, 0.98), "LoRA r=16 mixed") == "no"
    assert verdict(rows(4, 0.85, 0.8, 0.88, "LoRA r=8 mixed"), "LoRA r=8 mixed") == "no"
    assert verdict(rows(4, 0.92, 0.8, 0.98, "LoRA r=8 mixed"), "LoRA r=8 mixed") == "yes"
    # OFT's goal counts from N = 16
    assert verdict(rows(4, 1.0, 0.9, 1.1, "OFT b=32 per adapter"), "OFT b=32 per adapter") == "-"
    assert verdict(rows(16, 2.0, 1.9, 2.1, "OFT b=32 per adapter"), "OFT b=32 per adapter") == "no"


def test_every_committed_result_plots(tmp_path, capsys):
    """``python -m benchmarks.plot`` draws every committed result kind (speed, peers, fine-tuning,
    serving, memory) without error."""
    pytest.importorskip("matplotlib")
    from benchmarks import plot

    assert plot.main(["--out", str(tmp_path)]) == 0
    names = {p.name for p in tmp_path.glob("*.png")}
    assert {"memory.png", "serving-cpu-x86_64-2t.png", "cpu-x86_64-2t-peers.png", "cpu-x86_64-2t-layer.png",
            "finetune-cpu-cpu-x86_64-2t.png", "finetune-ablation-cpu-cpu-x86_64-2t.png"} <= names, names
