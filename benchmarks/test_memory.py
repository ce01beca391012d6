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


@pytest.mark.parametrize("name", ["qGOFT quasi+scale" + memory.GPU, "qGOFT quasi" + memory.CPU, "PEFT LoRA r=8",
                                  "PEFT OFT b=32"])
def test_under_checkpointing_a_layer_saves_its_input_as_the_frozen_layer_does(name):
    """A checkpointed forward keeps its input alone (x, bf16), whatever the method: nothing
    beyond the frozen layer's."""
    import torch

    from benchmarks.methods import make_linear

    x = torch.empty(TOKENS, D, device="meta", dtype=memory.DTYPE, requires_grad=True)
    assert memory._checkpointed(make_linear(D, K, "meta", memory.DTYPE), x) == TOKENS * D * 2
    assert memory.layer_memory(name, D, K, TOKENS).checkpointed_bytes == 0


def test_the_paper_methods_checkpointed_count_does_not_grow_with_the_rows():
    assert memory._paper_checkpointed(D, K, rows=4) == memory._paper_checkpointed(D, K, rows=16) == 0


def test_a_checkpointed_model_keeps_one_blocks_activations():
    """Per model with checkpointing: every layer's checkpointed extra (0) plus one block's layers
    rebuilt in the backward: the saved bytes without checkpointing over the layer count."""
    (row,) = memory.model_rows("tiny", memory.TINY_MODELS["tiny"], ["PEFT LoRA r=8"], [TOKENS])
    one_block = sum(row["saved_bytes_per_target"].values())
    assert row["checkpointed_bytes"] == row["saved_bytes"] // row["layers"] == one_block
