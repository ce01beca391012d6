"""PEFT's four calls with a qGOFT config: get_peft_model, save_pretrained, from_pretrained, merge_and_unload."""
import pytest
import torch
import torch.nn as nn

import qgoft_kernels as qk
from qgoft_kernels.verify import assert_close

# qgoft_kernels.peft needs PEFT >= 0.21 (its MIN_PEFT); older versions skip with the version in the reason
peft = pytest.importorskip("peft", minversion="0.21")
from qgoft_kernels.peft import MIN_PEFT, QGOFTConfig  # noqa: E402


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(20, 20)
        self.v = nn.Linear(20, 12)
        self.head = nn.Linear(12, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.v(self.q(x))))


pytestmark = pytest.mark.usefixtures("torch_path")


def make(seed=0):
    torch.manual_seed(seed)
    return Tiny()


def train(model, x, steps=5):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


@pytest.mark.parametrize("block, scale", [("quasi", False), ("quasi", True), ("givens", True)])
def test_four_calls(tmp_path, block, scale, gen):
    x = torch.randn(6, 20, generator=gen)
    base_out = make()(x)
    model = peft.get_peft_model(make(), QGOFTConfig(target_modules=["q", "v"], block=block, scale=scale))
    assert torch.equal(model(x), base_out)  # identity at init
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("qgoft_" in n for n in trainable) and len(trainable) == (4 if scale else 2)
    expected = 2 * (qk.num_pairs(20) * (4 if block == "quasi" else 1) + (20 if scale else 0))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    train(model, x)
    out = model(x)
    assert not torch.allclose(out, base_out)

    model.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(make(), tmp_path)
    assert torch.equal(loaded(x), out)
    merged = loaded.merge_and_unload()
    assert type(merged.q) is nn.Linear and type(merged.v) is nn.Linear
    assert_close(merged(x), out)


def test_merge_unmerge_round_trip(gen):
    model = peft.get_peft_model(make(), QGOFTConfig(target_modules=["q"], block="quasi", scale=True))
    train(model, torch.randn(8, 20, generator=gen))
    x = torch.randn(3, 20, generator=gen)
    layer = model.base_model.model.q
    w0 = layer.base_layer.weight.detach().clone()
    out = model(x)
    model.merge_adapter()
    assert_close(model(x), out)
    model.unmerge_adapter()
    assert_close(layer.base_layer.weight, w0)
    assert_close(model(x), out)
    with model.disable_adapter():
        assert_close(model(x), make()(x), atol=1e-6)


def test_config_checks_its_options():
    with pytest.raises(ValueError, match="block must be one of"):
        QGOFTConfig(target_modules=["q"], block="lora")


def test_same_as_givens_linear(gen):
    """The PEFT layer and GivensLinear compute the same thing from the same parameters."""
    model = peft.get_peft_model(make(), QGOFTConfig(target_modules=["q"], block="quasi", init_weights=False))
    layer = model.base_model.model.q
    ours = qk.GivensLinear.from_linear(layer.base_layer, block="quasi")
    with torch.no_grad():
        ours.rotation.copy_(layer.qgoft_rotation["default"])
    x = torch.randn(4, 20, generator=gen)
    assert torch.equal(layer(x), ours(x))


def test_penalty_covers_peft_layers(gen):
    """qk.orthogonality_penalty(model) sums the quasi blocks' penalty of a PEFT model too."""
    torch.manual_seed(1)
    model = peft.get_peft_model(make(), QGOFTConfig(target_modules=["q", "v"], block="quasi", init_weights=False))
    penalty = qk.orthogonality_penalty(model)
    expected = torch.zeros(())
    for name in ("q", "v"):
        b = getattr(model.base_model.model, name).qgoft_rotation["default"].detach().double()
        expected += ((b[:, 0, 0] * b[:, 0, 1] + b[:, 1, 0] * b[:, 1, 1]) ** 2).sum()
    assert expected > 0
    assert_close(penalty, expected, rtol=1e-6)
    penalty.backward()
    grad = model.base_model.model.q.qgoft_rotation["default"].grad
    assert grad is not None and grad.abs().sum() > 0


def test_minimum_peft_version_is_declared():
    """The module's MIN_PEFT, pyproject's extras and the tests' skip agree."""
    import os
    import re

    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pyproject.toml")) as fh:
        pins = re.findall(r'"peft>=([0-9.]+)"', fh.read())
    assert pins and set(pins) == {MIN_PEFT}
    with open(__file__) as fh:
        assert f'minversion="{MIN_PEFT}"' in fh.read()


# --- issue 11: unmerge gives W back or refuses; shared modules -------------------------------------------------


def _merged_q(blocks):
    """A PEFT model whose layer ``q`` carries the quasi ``blocks`` [19, 2, 2], merged."""
    model = peft.get_peft_model(make(), QGOFTConfig(target_modules=["q"], block="quasi"))
    layer = model.base_model.model.q
    with torch.no_grad():
        layer.qgoft_rotation["default"].copy_(blocks)
    w0 = layer.base_layer.weight.detach().clone()
    model.merge_adapter()
    return model, layer, w0


def _random_blocks(gen):
    return torch.eye(2) + 0.3 * torch.randn(qk.num_pairs(20), 2, 2, generator=gen)


def test_unmerge_error_leaves_the_layer_merged(gen):
    """A refused unmerge changes nothing: the layer stays merged, so the forward is still right."""
    blocks = _random_blocks(gen)
    blocks[4] = torch.tensor([[1.0, 2.0], [2.0, 4.0]])  # singular
    model, layer, _ = _merged_q(blocks)
    x = torch.randn(3, 20, generator=gen)
    out = model(x)
    w_merged = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="cannot unmerge"):
        model.unmerge_adapter()
    assert layer.merged and layer.merged_adapters == ["default"]
    assert torch.equal(layer.base_layer.weight, w_merged)
    assert torch.equal(model(x), out)  # R applied once, not twice


@pytest.mark.parametrize("bad", [1, 3], ids=["one-block", "three-blocks"])
def test_unmerge_refuses_ill_conditioned_blocks(bad, gen):
    """An ill-conditioned (not singular) quasi block would give back a silently different W."""
    blocks = _random_blocks(gen)
    for p in range(bad):
        blocks[3 + 5 * p] = torch.tensor([[1.0, 1.0], [1.0, 1.0 + 1e-6]])
    model, layer, _ = _merged_q(blocks)
    w_merged = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="ill-conditioned"):
        model.unmerge_adapter()
    assert torch.equal(layer.base_layer.weight, w_merged) and layer.merged


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_unmerge_gives_back_the_weight_to_its_precision(dtype, gen):
    """Well-conditioned adapters unmerge within the promised bound, in the weight's dtype."""
    from qgoft_kernels.peft import UNMERGE_RTOL

    model = peft.get_peft_model(make().to(dtype), QGOFTConfig(target_modules=["q", "v"], block="quasi", scale=True))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "qgoft_" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    w0 = {n: model.base_model.model.get_submodule(n).base_layer.weight.detach().clone() for n in ("q", "v")}
    model.merge_adapter()
    model.unmerge_adapter()
    for n, w in w0.items():
        assert_close(model.base_model.model.get_submodule(n).base_layer.weight, w, rtol=UNMERGE_RTOL[dtype])


def test_shared_linear_is_refused_clearly():
    """PEFT walks each module once: a Linear used at two places would be adapted at one only."""

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = nn.Linear(8, 8)
            self.second = self.first

        def forward(self, x):
            return self.second(torch.tanh(self.first(x)))

    for targets in (["first"], ["second"], "all-linear"):
        with pytest.raises(ValueError, match=r"used at several places \['first', 'second'\]"):
            peft.get_peft_model(Shared(), QGOFTConfig(target_modules=targets))


def test_wrong_input_width_names_x():
    model = peft.get_peft_model(make(), QGOFTConfig(target_modules=["q"]))
    with pytest.raises(ValueError, match=r"x has 21 features \(its last dimension\); this layer takes in_features=20"):
        model.base_model.model.q(torch.randn(2, 21))


# --- merging several adapters: the forward's order, however the merges are split ---------------------------------


def _two_adapters(active):
    """A PEFT model with adapters ``a`` (quasi, scaled) and ``b`` (Givens) on ``q`` and ``v``,
    away from the identity, ``active`` (in that order: the forward applies them so)."""
    options = dict(target_modules=["q", "v"], init_weights=False)
    model = peft.get_peft_model(make(), QGOFTConfig(block="quasi", scale=True, **options), adapter_name="a")
    model.add_adapter("b", QGOFTConfig(block="givens", **options))
    model.base_model.set_adapter(list(active))
    return model


@pytest.mark.parametrize("active", [("a", "b"), ("b", "a")], ids=["active-ab", "active-ba"])
@pytest.mark.parametrize("calls", [[["a"], ["b"]], [["b"], ["a"]], [["a", "b"]], [["b", "a"]], [None]],
                         ids=["a-then-b", "b-then-a", "batch-ab", "batch-ba", "all-active"])
def test_merges_in_any_order_equal_the_forward(calls, active, gen):
    """Rotations do not commute: merged one call at a time or in one call, in any order, the
    layer equals the forward with both adapters active (and PEFT's sequential-merge test's
    batch merge), and unmerging gives W back."""
    model = _two_adapters(active)
    x = torch.randn(5, 20, generator=gen)
    out = model(x)
    layers = {n: model.base_model.model.get_submodule(n) for n in ("q", "v")}
    w0 = {n: layer.base_layer.weight.detach().clone() for n, layer in layers.items()}
    for names in calls:
        model.merge_adapter(names)
    assert all(sorted(layer.merged_adapters) == ["a", "b"] for layer in layers.values())
    assert_close(model(x), out)
    model.unmerge_adapter()
    for n, layer in layers.items():
        assert not layer.merged
        assert_close(layer.base_layer.weight, w0[n])
    assert_close(model(x), out)


def test_merging_after_an_unmergeable_adapter_is_refused_unchanged(gen):
    """A later adapter's merge needs the earlier one undone: where that is refused (an
    ill-conditioned R), the merge is refused too and the layer keeps its weight."""
    model = _two_adapters(("a", "b"))
    layer = model.base_model.model.q
    with torch.no_grad():
        layer.qgoft_rotation["a"][3] = torch.tensor([[1.0, 1.0], [1.0, 1.0 + 1e-6]])
    model.merge_adapter(["a"])
    w_merged = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match=r"cannot merge \['b'\] into a layer with \['a'\] merged.*ill-conditioned"):
        model.merge_adapter(["b"])
    assert layer.merged_adapters == ["a"] and torch.equal(layer.base_layer.weight, w_merged)
