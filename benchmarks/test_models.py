"""``python -m benchmarks.models`` on the CPU: tiny configs, every method one step; no ratio is asserted."""
import json
import math
import os
import re
import statistics

import pytest
import torch
import torch.nn as nn

import qgoft_kernels as qk
from benchmarks import gpu_quick, models, rehearsal

METHODS = {m.key: m for m in models.METHODS}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread is many times faster than two on a shared, busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def context(tmp_path, spec):
    meta = {**{k: None for k in models.FIELDS}, "dry_run": True, "tiny": True, "device": "cpu", "device_type": "cpu"}
    record = gpu_quick.Recorder(str(tmp_path / models.OUT_NAME), meta, models.FIELDS)
    ctx = models.Context(torch.device("cpu"), torch.bfloat16, float("inf"), steps=1, warmup=1, record=record)
    # the kernels' own checks are the dry run's (below); here the PyTorch path runs our methods
    ctx.kernels_ok = {u: True for u in models.units_for(spec, models.METHODS)}
    ctx.boft = (False, "not built in this test")
    return ctx


@pytest.mark.parametrize("key", ["deberta", "llama"])
def test_every_method_trains_one_step(key, tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # our methods on the PyTorch path: quick
    spec = models.TINY[key]
    ctx = context(tmp_path, spec)
    for method in models.METHODS:
        models.run_method(spec, method, ctx)
    rows = {r["method_key"]: r for r in ctx.record.rows}
    assert list(rows) == list(models.METHOD_KEYS)
    dims = {name: m.in_features for name, m in models.build_model(spec, "cpu", torch.bfloat16).named_modules()
            if isinstance(m, nn.Linear) and re.fullmatch(spec.targets, name)}
    for k, r in rows.items():
        assert r["ok"], (k, r["note"])
        assert r["steps"] == 1 and len(r["times_ms"]) == 1 and r["median_ms"] > 0 and math.isfinite(r["loss"])
        # every adapter starts at the identity: the no-adapter loss
        assert r["check"]["rel_diff"] <= models.CHECK_RTOL
        assert (r["penalty"] is not None) == (k in ("qgoft", "paper"))
        assert r["layers"] == 2 and r["tokens"] == spec.tokens and r["ratio_to_lora"] is not None
    # after one AdamW step off a perturbed start, the penalty is a real term
    assert rows["qgoft"]["penalty"] > 0 and rows["paper"]["penalty"] > 0
    assert rows["qgoft"]["adapter_params"] == rows["paper"]["adapter_params"] == sum(4 * (d - 1) for d in dims.values())
    assert rows["goft"]["adapter_params"] == sum(d - 1 for d in dims.values())
    assert rows["goft-scale"]["adapter_params"] == sum(2 * d - 1 for d in dims.values())
    assert rows["frozen"]["adapter_params"] == 0
    assert (rows["frozen"]["trainable"] > 0) == (key == "deberta")  # the classification head trains
    assert rows["lora"]["adapter_params"] == sum(spec.lora_r * (d + m.out_features) for d, m in zip(
        dims.values(), [models.build_model(spec, "meta", torch.bfloat16).get_submodule(n) for n in dims]))
    assert "rehearsal only" in rows["boft"]["note"]


def test_the_penalty_is_in_the_loss(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    spec = models.TINY["llama"]
    model, _ = models.adapt(models.build_model(spec, "cpu", torch.float32), spec, METHODS["qgoft"])
    models.perturb(model)
    batch = models.make_batch(spec, "cpu")
    loss, penalty = models.loss_fn(model, {"input_ids": batch["input_ids"]}, batch["labels"], spec, METHODS["qgoft"])
    task = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    assert penalty > 0 and penalty == qk.orthogonality_penalty(model)
    assert torch.allclose(loss, task + spec.penalty * penalty)


@pytest.mark.parametrize("key", ["deberta", "llama"])
def test_units_cover_every_launch(key, monkeypatch):
    """The compile phase compiles every kernel specialisation a training step launches."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    spec = models.TINY[key]
    launches = set()
    rotate, linear = qk.nn.givens_rotate, qk.nn.givens_linear

    def record(x, kw):
        launches.add(("forward", x.shape[-1], kw["block"], kw["scale"] is not None, True))
        launches.add(("backward", x.shape[-1], kw["block"], kw["scale"] is not None, x.requires_grad))

    def spy_rotate(x, params, **kw):
        record(x, kw)
        return rotate(x, params, **kw)

    def spy_linear(x, weight, bias, params, **kw):  # GivensLinear's forward: the same kernels on CUDA
        record(x, kw)
        return linear(x, weight, bias, params, **kw)

    monkeypatch.setattr(qk.nn, "givens_rotate", spy_rotate)
    monkeypatch.setattr(qk.nn, "givens_linear", spy_linear)
    for method in models.METHODS:
        if method.kernels:
            model, _ = models.adapt(models.build_model(spec, "cpu", torch.bfloat16), spec, method)
            batch = models.make_batch(spec, "cpu")
            models.loss_fn(model, {"input_ids": batch["input_ids"]}, batch["labels"], spec, method)[0].backward()
    units = {(u.path, u.d, u.block, u.scale, u.need_dx) for u in models.units_for(spec, models.METHODS)}
    assert launches and launches <= units
    assert any(not need_dx for *_, need_dx in launches)  # the first block's layers: no dx


def test_full_size_models_match_the_papers_counts():
    """Built on the meta device (no memory): the adapted layers give the paper's parameter counts."""
    for spec, goft in ((models.DEBERTA, 82_872), (models.LLAMA, 524_160)):
        model = models.build_model(spec, "meta", torch.bfloat16)
        dims = [m.in_features for name, m in model.named_modules()
                if isinstance(m, nn.Linear) and re.fullmatch(spec.targets, name)]
        assert len(dims) == spec.layers * {"deberta": 6, "llama": 4}[spec.key]
        assert sum(d - 1 for d in dims) == goft
    assert models.adapted_dims(models.DEBERTA) == [768, 3072] and models.adapted_dims(models.LLAMA) == [4096]
    assert models.LLAMA.tokens == 2048 and models.DEBERTA.tokens == 4096


def test_paper_ratios():
    assert {k: models.paper_ratio(k) for k in models.PAPER_SECONDS} == {
        "LoRA": 1.0, "AdaLoRA": 1.28, "OFT": 1.61, "GOFT": 5.36, "qGOFT": 5.6}


@pytest.mark.parametrize("flag", ["--dry-run", "--tiny"])
def test_a_rehearsal_is_never_written_among_the_results(flag):
    with pytest.raises(SystemExit):
        models.main([flag, "--out", os.path.join(gpu_quick.RESULTS, "models-dry")])


def test_table_judges_the_targets():
    meta = dict(schema=models.SCHEMA, run_id="r", dry_run=False, tiny=False, device="NVIDIA H200",
                device_type="cuda", driver="580", cuda="13.0", torch="2.11", triton="3.6.0", transformers="5.17",
                peft="0.21", python="3.12", numpy="2.5", commit="abc", commit_source="QGOFT_COMMIT",
                timer="CUDA events", env_pins={})

    def row(**fields):
        return {**{k: None for k in models.FIELDS}, **meta, **fields}

    def step(key, ms, **fields):
        method = METHODS[key]
        return row(kind="step", model="llama", layers=32, batch=4, seq=512, tokens=2048, dtype="bfloat16",
                   method=models.method_label(method, models.LLAMA), method_key=key, paper_row=method.paper_row,
                   paper_ratio=models.paper_ratio(method.paper_row), ok=True, steps=10, median_ms=ms, q20_ms=ms,
                   q80_ms=ms, tokens_per_s=2048 / ms * 1e3, peak_bytes=40 * 2**30, trainable=1000, adapter_params=1000,
                   ratio_to_lora=ms / 100.0, **fields)

    rows = [step("lora", 100.0), step("qgoft", 95.0), step("paper", 900.0),
            row(kind="step", model="llama", layers=32, batch=4, seq=512, method="PEFT BOFT b=4 m=2",
                method_key="boft", ok=None, note="skipped: PEFT's BOFT CUDA extension did not build within 60 s"),
            row(kind="targets", model="llama", ok=True, check={"qgoft_over_lora": 0.95, "paper_over_qgoft": 900 / 95}),
            row(kind="summary", ok=True, seconds=300.0, note="finished")]
    text = models.table(rows)
    assert text.startswith("WHOLE-MODEL TRAINING STEP on NVIDIA H200") and "NOT GPU DATA" not in text
    assert "| qGOFT + penalty (lambda 0.01) | qGOFT | 5.60 | 95.00 |" in text
    assert "| PEFT LoRA r=16 | LoRA | 1.00 | 100.00 |" in text and "| (AdaLoRA: not run) | AdaLoRA | 1.28 |" in text
    assert "NOT TIMED: skipped: PEFT's BOFT CUDA extension did not build within 60 s" in text
    assert "qGOFT / LoRA = 0.95 (at most 1.0: met); paper's dense / qGOFT = 9.47 (at least 5: met)" in text
    rows[4] = row(kind="targets", model="llama", ok=False, check={"qgoft_over_lora": 1.2, "paper_over_qgoft": None})
    assert "qGOFT / LoRA = 1.20 (at most 1.0: MISSED); paper's dense / qGOFT = - (at least 5: not measured)" in (
        models.table(rows))


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """A short dry run in a subprocess, as ``make models-dry`` runs it: its stdout and JSON lines."""
    return rehearsal.run("benchmarks.models", ["--model", "llama", "--methods", "qgoft,paper", "--steps", "2",
                                               "--warmup", "1"], tmp_path_factory.mktemp("models"), models.OUT_NAME)


@pytest.mark.slow
@pytest.mark.kernel
def test_dry_run_is_labelled_and_complete(dry_run, tmp_path, capsys):
    stdout, rows = dry_run
    assert "CPU DRY RUN" in stdout and "NOT GPU DATA" in stdout and "Targets: not judged" in stdout
    assert stdout.rstrip().endswith(models.table(rows).rstrip())
    for r in rows:
        assert list(r) == list(models.FIELDS)
        assert r["schema"] == models.SCHEMA and r["run_id"] == rows[0]["run_id"]
        assert r["dry_run"] is True and r["tiny"] is True and r["device_type"] == "cpu"
    compiled = [r for r in rows if r["kind"] == "compile"]
    assert len(compiled) == 3 and all(r["ok"] and r["block"] == "quasi" for r in compiled)  # qGOFT at d=64
    steps = [r for r in rows if r["kind"] == "step"]
    assert [r["method_key"] for r in steps] == ["lora", "qgoft", "paper"]
    assert all(r["ok"] and r["steps"] == 2 and r["peak_bytes"] is None for r in steps)
    assert [r["kind"] for r in rows[-2:]] == ["targets", "summary"] and rows[-2]["ok"] is None
    path = tmp_path / "again.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert models.main(["--table", str(path)]) == 0
    assert capsys.readouterr().out.rstrip() == models.table(rows).rstrip()


def test_the_cpu_table_times_every_method_in_one_interleaved_run(tmp_path, monkeypatch, capsys):
    """``--device cpu --tiny``: every method built, checked at its identity start, timed once a
    round; ratios to LoRA paired by round; the table beside the paper's ratios."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the CPU table times the PyTorch path whatever this says
    assert models.main(["--device", "cpu", "--tiny", "--out", str(tmp_path), "--steps", "2"]) == 0
    (path,) = tmp_path.glob("models-cpu-*.json")
    result = json.loads(path.read_text())
    rows = {r["method_key"]: r for r in result["rows"]}
    assert list(rows) == list(models.METHOD_KEYS) and result["rounds"] == 2 and result["meta"]["tiny"]
    for key, r in rows.items():
        assert r["start_ok"] and r["check"]["rel_diff"] <= models.CHECK_RTOL, key
        assert len(r["times_ms"]) == 2 and r["median_ms"] > 0 and math.isfinite(r["loss"])
        assert r["ratio_to_lora"]["rounds"] == 2
        paired = [a / b for a, b in zip(r["times_ms"], rows["lora"]["times_ms"])]
        assert r["ratio_to_lora"]["median"] == pytest.approx(statistics.median(paired), rel=1e-3)
    assert rows["qgoft"]["paper_ratio"] == models.paper_ratio("qGOFT") and rows["goft-scale"]["paper_ratio"] is None
    text = capsys.readouterr().out
    assert all(f"| {models.method_label(m, models.cpu_spec(True))} |" in text for m in models.METHODS)
    assert "| PEFT LoRA r=8 | LoRA | 1.00 |" in text


def test_the_cpu_table_refuses_to_write_a_tiny_run_among_the_results():
    with pytest.raises(SystemExit, match="not a result"):
        models.main(["--device", "cpu", "--tiny", "--out", os.path.join(gpu_quick.RESULTS, "x")])


def test_the_cpu_table_names_an_unknown_method(tmp_path, capsys):
    with pytest.raises(SystemExit):
        models.main(["--device", "cpu", "--tiny", "--out", str(tmp_path), "--methods", "lora,dora"])
    assert "--methods takes names from" in capsys.readouterr().err


def test_models_side_by_side_share_the_frozen_weights_not_the_head(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    spec = models.cpu_spec(True)
    base = models.build_model(spec, "cpu", torch.float32)
    copied = models._sharing_copy(base, spec)
    for name, p in copied.named_parameters():
        head = name.split(".")[0] in spec.head
        assert (p.data_ptr() == base.get_parameter(name).data_ptr()) != head, name
    # a method put on the copy trains its own adapter and head, and leaves the base as it was
    before = {n: p.clone() for n, p in base.named_parameters()}
    prepared = models.prepare(spec, METHODS["qgoft"], "cpu", torch.float32, base)
    prepared.step()
    assert all(torch.equal(p, before[n]) for n, p in base.named_parameters())
    assert not any(p.requires_grad for p in base.parameters())
