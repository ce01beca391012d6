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

D, K, TOKENS = 64, 64, 128
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
