"""``make gpu-quick`` rehearsed on the CPU: the whole pipeline at tiny shapes, and its output."""
import json
import os

import pytest

from benchmarks import gpu_quick, rehearsal

TIMED = ("clone", "forward", "forward_t", "backward", "merge", "merge_kernel", "mixed")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run in a subprocess (as ``make gpu-quick-dry`` runs it): its stdout and JSON lines."""
    tmp = tmp_path_factory.mktemp("gpu-quick")
    # the static model's rows: one matches the dry run's shapes, so the lookup shows in the output
    preds = tmp / "sass.json"
    preds.write_text(json.dumps({"rows": [
        {"kernel": "forward", "d": 16, "dtype": "bfloat16", "block": "quasi", "default": True,
         "predicted_over_clone": 1.07},
        {"kernel": "forward", "d": 16, "dtype": "bfloat16", "block": "quasi", "default": False,
         "predicted_over_clone": 9.0}]}))
    return rehearsal.run("benchmarks.gpu_quick", ["--predictions", str(preds), "--deadline", "300"], tmp,
                         gpu_quick.OUT_NAME)


@pytest.mark.slow
@pytest.mark.kernel
def test_dry_run_is_labelled_and_complete(dry_run):
    stdout, rows = dry_run
    assert "CPU DRY RUN" in stdout and "NOT GPU DATA" in stdout
    # the table comes last, from the same rows
    assert stdout.rstrip().endswith(gpu_quick.table(rows).rstrip())
    for r in rows:
        assert list(r) == list(gpu_quick.FIELDS)
        assert r["schema"] == gpu_quick.SCHEMA and r["run_id"] == rows[0]["run_id"]
        assert r["dry_run"] is True and r["device"] == "cpu" and r["device_type"] == "cpu"
        assert r["commit"] and r["commit_source"] in ("git", "QGOFT_COMMIT", "COMMIT file", "none")
        assert "dry run" in r["timer"].lower()
    kinds = [r["kind"] for r in rows]
    assert kinds[-1] == "summary" and rows[-1]["ok"] and rows[-1]["note"] == "finished"
    # compile phase first: every unit passed its float64 checks, with the numbers to show it
    compiled = [r for r in rows if r["kind"] == "compile"]
    assert kinds[:len(compiled)] == ["compile"] * len(compiled)
    for r in compiled:
        assert r["ok"] and r["seconds"] > 0 and r["errors"]["timed_shape_all_written"]
        for err, bound in list(r["errors"]["fresh_rows"].values()) + list(r["errors"]["timed_shape_rows"].values()):
            assert 0 <= err <= bound
        if r["method"] == "mixed":
            # row by row against each adapter's float64 oracle, the base rows bit for bit
            assert r["errors"]["fresh_rows"] == {} and r["errors"]["base_rows_bit_equal"]
            assert r["errors"]["timed_shape_rows"] and all(k.startswith("y[adapter ")
                                                           for k in r["errors"]["timed_shape_rows"])
            continue
        assert set(r["errors"]["fresh_rows"]) == ({"y"} if r["method"] != "backward" else
                                                  {"dx", "dparams"} | ({"dscale"} if r["scale"] else set()))


@pytest.mark.slow
@pytest.mark.kernel
def test_dry_run_measurements(dry_run):
    _, rows = dry_run
    plan = gpu_quick.DRY_PLAN
    timed = [r for r in rows if r["kind"] in TIMED]
    for r in timed:
        assert r["ok"] and r["repeat"] in (0, 1) and r["dtype"] == "bfloat16"
        assert 0 < r["q20_ms"] <= r["median_ms"] <= r["q80_ms"]
        assert r["bytes"] > 0 and r["gbps"] == pytest.approx(r["bytes"] / (r["median_ms"] * 1e-3) / 1e9)
    # every kernel kind at every width and variant, twice, each next to its own clone
    for kind in ("forward", "forward_t", "backward"):
        for d in plan.dims:
            clones = [r for r in timed if r["kind"] == "clone" and r["note"] == f"next to {kind}" and r["d"] == d]
            assert len(clones) == 2
            for block, scale in gpu_quick.VARIANTS:
                got = [r for r in timed if (r["kind"], r["d"], r["block"], r["scale"]) == (kind, d, block, scale)]
                assert [r["repeat"] for r in got] == [0, 1]
                for r in got:
                    assert r["rows"] == plan.rows and r["ratio_to"] == "torch.clone"
                    assert r["ratio"] == pytest.approx(r["median_ms"] / clones[r["repeat"]]["median_ms"])
                    assert r["bytes"] == (3 if kind == "backward" else 2) * plan.rows * d * 2
                    assert r["config"] is not None and r["target"] is not None
    for kind in ("merge", "merge_kernel"):
        got = [r for r in timed if r["kind"] == kind]
        assert len(got) == 2 * len(gpu_quick.VARIANTS) and all(r["d"] == plan.merge_dim for r in got)
    # the mixed batch: each run length, both variants, twice, next to its clones
    got = [r for r in timed if r["kind"] == "mixed"]
    assert len(got) == 2 * len(gpu_quick.VARIANTS) * len(plan.mixed_runs)
    assert {r["method"].split("runs of ")[1] for r in got} == {str(n) for n in plan.mixed_runs}
    assert all(r["d"] == plan.mixed_dim and r["target"] == 1.2 and r["bytes"] == 2 * plan.rows * plan.mixed_dim * 2
               for r in got)
    assert len([r for r in timed if r["kind"] == "clone" and r["note"] == "next to mixed"]) == 2 * len(plan.mixed_runs)
    # the static model's default row, and only there
    preds = {(r["kind"], r["d"], r["method"]): r["predicted_ratio"] for r in timed if r["predicted_ratio"] is not None}
    assert preds == {("forward", 16, "quasi+scale"): 1.07}
    layer = [r for r in rows if r["kind"] == "layer_step"]
    assert [r["method"] for r in layer] == list(gpu_quick.LAYER_METHODS) * 2
    for r in layer:
        assert r["ok"] and r["median_ms"] > 0 and r["ratio_to"] == "frozen nn.Linear"
        assert r["d"] == plan.layer_dim and r["rows"] == plan.tokens
        assert r["saved_bytes_above"] is not None and r["peak_bytes_above"] is None  # no CUDA memory on a CPU
        if r["method"] == "frozen nn.Linear":
            assert r["ratio"] == 1.0 and r["trainable"] == 0 and r["saved_bytes_above"] == 0
        else:
            assert r["ratio"] > 0 and r["trainable"] > 0


@pytest.mark.slow
@pytest.mark.kernel
def test_table_from_the_file(dry_run, tmp_path, capsys):
    _, rows = dry_run
    path = tmp_path / "again.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert gpu_quick.main(["--table", str(path)]) == 0
    assert capsys.readouterr().out.rstrip() == gpu_quick.table(rows).rstrip()


def test_units_cover_what_is_timed():
    plan = gpu_quick.GPU_PLAN
    groups = gpu_quick.groups(plan, gpu_quick.KINDS, None)
    units = {u for g in groups for u in gpu_quick.units_for(g, plan)}
    # 6 widths x 2 variants x 3 paths, plus the merge's 4096-row W and the mixed batch's two; the layer's
    # are among them
    assert len(units) == 6 * 2 * 3 + 2 + 2
    assert all(u.rows == plan.rows or (u.path, u.rows) == ("forward_t", plan.merge_dim) for u in units)
    assert {u.adapters for u in units if u.path == "mixed"} == {plan.mixed_adapters}
    assert [g for g in gpu_quick.groups(plan, ("backward",), (4096,))] == [("backward", 4096)]


def test_prediction_lookup():
    rows = [{"kernel": "backward", "d": 4096, "dtype": "bf16", "block": "quasi+scale", "default": True,
             "predicted_over_clone": 1.6},
            {"kernel": "backward", "d": 4096, "dtype": "bfloat16", "block": "givens", "scale": False,
             "default": True, "gpu": "H100-SXM", "predicted_over_clone": 1.4, "predicted_over_clone_opt": 1.3},
            {"kernel": "backward", "d": 4096, "dtype": "bfloat16", "block": "givens", "scale": False,
             "default": True, "gpu": "H200", "predicted_over_clone": 1.7, "predicted_over_clone_opt": 1.5}]

    def pess(*args, **kw):
        return gpu_quick.predicted(rows, *args, **kw)["predicted_ratio"]

    assert pess("backward", 4096, "bfloat16", "quasi", True) == 1.6
    # each card gets its own row; without a card, the first
    assert gpu_quick.predicted(rows, "backward", 4096, "bfloat16", "givens", False, "H200") == {
        "predicted_ratio": 1.7, "predicted_opt": 1.5, "predicted_card": "H200"}
    assert pess("backward", 4096, "bfloat16", "givens", False, card="H100-SXM") == 1.4
    assert pess("backward", 4096, "bfloat16", "givens", False) == 1.4
    assert pess("backward", 4096, "bfloat16", "givens", True) is None
    assert pess("forward", 4096, "bfloat16", "quasi", True) is None
    assert gpu_quick.load_predictions("/nonexistent/sass-sm90.json") == []
    assert gpu_quick.card_of("NVIDIA H100 80GB HBM3") == "H100-SXM"
    assert gpu_quick.card_of("NVIDIA H200") == "H200" and gpu_quick.card_of("NVIDIA A100-SXM4-80GB") is None


def test_a_dry_run_is_never_written_among_the_results():
    with pytest.raises(SystemExit):
        gpu_quick.main(["--dry-run", "--out", os.path.join(gpu_quick.RESULTS, "dry")])


def test_table_shows_what_failed_and_marks_targets():
    meta = dict(schema=gpu_quick.SCHEMA, run_id="r", dry_run=False, device="NVIDIA H200", device_type="cuda",
                driver="580", cuda="13.0", torch="2.11", triton="3.6.0", python="3.12", numpy="2.5", peft="0.21",
                commit="abc", commit_source="QGOFT_COMMIT", timer="do_bench", env_pins={})
    blank = {k: None for k in gpu_quick.FIELDS}

    def row(**fields):
        return {**blank, **meta, **fields}

    timing = dict(q20_ms=0.09, q80_ms=0.11, bytes=10**8, gbps=1000.0)
    rows = [
        row(kind="compile", method="backward", d=4096, rows=16384, block="givens", scale=False, ok=False,
            note="check failed: no timing"),
        row(kind="clone", method="torch.clone", d=4096, rows=16384, repeat=0, ok=True, median_ms=0.1, ratio=1.0,
            note="next to forward", **timing),
        row(kind="forward", method="quasi+scale", d=4096, rows=16384, block="quasi", scale=True, repeat=0, ok=True,
            median_ms=0.105, ratio=1.05, predicted_ratio=1.02, predicted_opt=1.0, predicted_card="H200", target=1.15,
            **timing),
        row(kind="forward", method="givens", d=4096, rows=16384, block="givens", scale=False, repeat=0, ok=True,
            median_ms=0.13, ratio=1.3, target=1.15, **timing),
        row(kind="backward", method="givens", d=4096, rows=16384, block="givens", scale=False, repeat=0, ok=False,
            note="failed or missing check: no timing"),
        row(kind="summary", ok=False, seconds=321.0, note="finished with failures"),
    ]
    text = gpu_quick.table(rows)
    assert text.startswith("GPU QUICK RUN on NVIDIA H200") and "DRY RUN" not in text
    assert "1/1 units pass" not in text and "0/1 units pass" in text and "FAILED backward d=4096" in text
    assert ("| forward | 4096 | 16384 | quasi+scale | 0.1050 | 0.0900-0.1100 | 1000 | 1.05 | 1.00-1.02 "
            "| <= 1.15 ok |") in text
    assert "optimistic-pessimistic ratio for H200" in text
    assert "| 1.30 | - | <= 1.15 OVER |" in text
    assert "Not timed:\n  backward d=4096 givens: failed or missing check: no timing" in text
    assert text.endswith("finished with failures; 321 s in all.")
