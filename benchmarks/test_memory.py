"""``python -m benchmarks.memory``: the saved-for-backward count against a hand count, and the command."""
import json

import pytest

from benchmarks import memory
from benchmarks.timing import saved_bytes, saved_storages

pytest.importorskip("peft")

D, K, TOKENS = 64, 32, 16


@pytest.mark.parametrize("name, params", [("GOFT givens", D - 1), ("qGOFT quasi", 4 * (D - 1)),
                                          ("qGOFT quasi+scale", 4 * (D - 1) + D)])
def test_ours_on_the_gpu_path_saves_x_and_its_parameters(name, params):
    """Beyond the frozen layer (its weight): x in its own dtype (bf16), and the fp32 parameters."""
    m = memory.layer_memory(name + memory.GPU, D, K, TOKENS)
    assert m.trainable == params and m.param_bytes == 4 * params
    assert m.saved_bytes == TOKENS * D * 2 + 4 * params


@pytest.mark.parametrize("r", [8, 16])
def test_lora_saves_x_in_fp32_and_x_times_a(r):
    """PEFT keeps its adapters in fp32 and casts x to it: x and x A in fp32, and A and B."""
    m = memory.layer_memory(f"PEFT LoRA r={r}", D, K, TOKENS)
    assert m.trainable == r * (D + K)
    assert m.saved_bytes == TOKENS * D * 4 + TOKENS * r * 4 + 4 * r * (D + K)


def test_every_method_runs_on_meta_and_the_command_writes_its_table(tmp_path, capsys):
    assert memory.main(["--tiny", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "memory.json").read_text())
    assert {r["method"] for r in result["rows"]} == set(memory.METHODS)
    for r in result["rows"]:
        assert r["saved_bytes"] > 0 and r["trainable"] > 0
        assert r["total_bytes"] == 4 * r["param_bytes"] + r["saved_bytes"]
    text = capsys.readouterr().out
    assert all(f"| {name} |" in text for name in memory.METHODS)


def test_saved_storages_tells_meta_storages_apart():
    import torch

    a, b = (torch.empty(10, device="meta", requires_grad=True) for _ in range(2))
    assert sorted(saved_storages(lambda: a * b).values()) == [40, 40]


def test_the_paper_methods_two_parts_add_up_to_its_whole_forward():
    """Its R is built on real tensors and the product measured on meta: on a small layer run
    whole on the CPU, the hooks see the same bytes."""
    import torch

    from benchmarks.methods import make_linear
    from benchmarks.paper_dense import PaperDenseGivensLinear

    base = make_linear(D, K, "cpu", memory.DTYPE)
    layer = PaperDenseGivensLinear.from_linear(base, block="quasi")
    x = torch.randn(TOKENS, D, dtype=memory.DTYPE, requires_grad=True)
    whole = saved_bytes(lambda: layer(x))
    frozen = saved_bytes(lambda: base(x))
    assert memory.paper_layer_memory(D, K, TOKENS).saved_bytes == whole - frozen
    # the d x d products of every stage are in it (ceil(log2 64) = 6 stages, fp32)
    assert whole - frozen > 6 * D * D * 4
