"""PEFT's four calls with a qGOFT config: get_peft_model, save_pretrained, from_pretrained, merge_and_unload."""
import pytest
import torch
import torch.nn as nn

import qgoft_kernels as qk
from qgoft_kernels.verify import rel_error

peft = pytest.importorskip("peft")
from qgoft_kernels.peft import QGOFTConfig  # noqa: E402


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
    assert rel_error(merged(x), out) < 1e-5


def test_merge_unmerge_round_trip(gen):
    model = peft.get_peft_model(make(), QGOFTConfig(target_modules=["q"], block="quasi", scale=True))
    train(model, torch.randn(8, 20, generator=gen))
    x = torch.randn(3, 20, generator=gen)
    layer = model.base_model.model.q
    w0 = layer.base_layer.weight.detach().clone()
    out = model(x)
    model.merge_adapter()
    assert rel_error(model(x), out) < 1e-5
    model.unmerge_adapter()
    assert rel_error(layer.base_layer.weight, w0) < 1e-5
    assert rel_error(model(x), out) < 1e-5
    with model.disable_adapter():
        assert torch.allclose(model(x), make()(x), atol=1e-6)


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
    assert rel_error(penalty, expected) < 1e-6
    penalty.backward()
    grad = model.base_model.model.q.qgoft_rotation["default"].grad
    assert grad is not None and grad.abs().sum() > 0


def test_wrong_input_width_names_x():
    model = peft.get_peft_model(make(), QGOFTConfig(target_modules=["q"]))
    with pytest.raises(ValueError, match=r"x has 21 features \(its last dimension\); this layer takes in_features=20"):
        model.base_model.model.q(torch.randn(2, 21))
